// argocd-lua: runs an Argo CD health check (health.lua) the way Argo CD runs it, for the tests
// (built by `python -m e2e.localcluster.build argocd-lua`).
//
//	argocd-lua [-open-libs] -script health.lua [FILE]    (no FILE, or "-": standard input)
//
// Reproduces util/lua/lua.go of argo-cd 3.6 (gopher-lua v1.1.2): a fresh LState per object; without
// -open-libs, only the libraries Argo CD opens for scripts from argocd-cm (package, base, table and
// a reduced os with time and date); with -open-libs, every gopher-lua library first, as for the
// built-in checks and `resource.customizations.useOpenLibs.<group>_<kind>: "true"` (the whole os
// library then stays: the safe os does not replace a loaded one). The object is
// the global `obj`, converted as Argo CD converts an unstructured object (JSON nulls are absent
// keys, and are dropped from arrays); the script runs under a 1 s deadline; the returned table is
// read back through JSON into {status, message}, with Argo CD's rules for empty or invalid results.
//
// Input: JSON, one object or an array of objects (a whole health_test.yaml in one run, each object
// in its own LState). Output: one result, or an array of results in input order:
// {"status", "message"} or {"error"} (the error Argo CD reports, which makes the health Unknown).
// Exit status 1 when any object's script failed (the errors are also written to stderr).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
)

// The health codes Argo CD accepts from a script; anything else becomes Unknown.
var validHealth = map[string]bool{
	"Unknown": true, "Progressing": true, "Suspended": true, "Healthy": true, "Degraded": true, "Missing": true,
}

const invalidHealthStatus = "Lua returned an invalid health status"

type healthResult struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

// safeOsFuncs are the two os functions Argo CD leaves to scripts (its own copies of gopher-lua's
// os.time and os.date), taken here from gopher-lua's os library itself.
func safeOsFuncs() map[string]lua.LGFunction {
	scratch := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer scratch.Close()
	scratch.Push(scratch.NewFunction(lua.OpenOs))
	scratch.Push(lua.LString(lua.OsLibName))
	scratch.Call(1, 0)
	osTable := scratch.GetGlobal(lua.OsLibName).(*lua.LTable)
	funcs := map[string]lua.LGFunction{}
	for _, name := range []string{"time", "date"} {
		funcs[name] = osTable.RawGetString(name).(*lua.LFunction).GFunction
	}
	return funcs
}

var safeOs = safeOsFuncs()

func openSafeOs(l *lua.LState) int {
	l.Push(l.RegisterModule(lua.OsLibName, safeOs))
	return 1
}

func loadSafeOs(l *lua.LState) int {
	l.Push(l.SetFuncs(l.NewTable(), safeOs))
	return 1
}

// newState opens the libraries in Argo CD's order: everything (open libs) or nothing, then package,
// base, table and the safe os over it (RegisterModule keeps an os table that is already loaded).
func newState(openLibs bool) *lua.LState {
	l := lua.NewState(lua.Options{SkipOpenLibs: !openLibs})
	libraries := []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
		{lua.OsLibName, openSafeOs},
	}
	for _, lib := range libraries {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), NRet: 0, Protect: true}, lua.LString(lib.name)); err != nil {
			panic(err)
		}
	}
	l.PreloadModule(lua.OsLibName, loadSafeOs) // `require("os")` gets the safe os too
	return l
}

// toLua converts a decoded JSON value with the same gopher-lua calls as Argo CD's decodeValue.
func toLua(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []any:
		array := l.CreateTable(len(v), 0)
		for _, item := range v {
			array.Append(toLua(l, item))
		}
		return array
	case map[string]any:
		table := l.CreateTable(0, len(v))
		for key, item := range v {
			table.RawSetH(lua.LString(key), toLua(l, item))
		}
		return table
	}
	return lua.LNil
}

// fromLua turns the script's result into a JSON-ready value under the rules of the encoder Argo CD
// uses (layeh.com/gopher-json): an empty table is an array; a table is an array if its first key is
// a number (then keys 1..n only) and an object if it is a string (then string keys only).
func fromLua(value lua.LValue, visiting map[*lua.LTable]bool) (any, error) {
	switch v := value.(type) {
	case lua.LBool:
		return bool(v), nil
	case lua.LNumber:
		return float64(v), nil
	case lua.LString:
		return string(v), nil
	case *lua.LNilType:
		return nil, nil
	case *lua.LTable:
		if visiting[v] {
			return nil, errors.New("cannot encode recursively nested tables to JSON")
		}
		visiting[v] = true
		defer delete(visiting, v)
		key, item := v.Next(lua.LNil)
		switch key.Type() {
		case lua.LTNil:
			return []any{}, nil
		case lua.LTNumber:
			var array []any
			for expected := lua.LNumber(1); key != lua.LNil; expected++ {
				if key.Type() != lua.LTNumber {
					return nil, errors.New("cannot encode mixed or invalid key types")
				}
				if key != expected {
					return nil, errors.New("cannot encode sparse array")
				}
				converted, err := fromLua(item, visiting)
				if err != nil {
					return nil, err
				}
				array = append(array, converted)
				key, item = v.Next(key)
			}
			return array, nil
		case lua.LTString:
			object := map[string]any{}
			for key != lua.LNil {
				if key.Type() != lua.LTString {
					return nil, errors.New("cannot encode mixed or invalid key types")
				}
				converted, err := fromLua(item, visiting)
				if err != nil {
					return nil, err
				}
				object[key.String()] = converted
				key, item = v.Next(key)
			}
			return object, nil
		}
		return nil, errors.New("cannot encode mixed or invalid key types")
	}
	return nil, fmt.Errorf("cannot encode %s to JSON", value.Type().String())
}

// health reads the script's returned value as Argo CD's ExecuteHealthLua does.
func health(returned lua.LValue) (healthResult, error) {
	switch returned.Type() {
	case lua.LTNil:
		return healthResult{}, nil
	case lua.LTTable:
	default:
		return healthResult{}, fmt.Errorf("expect table output from Lua script, not %s", returned.Type().String())
	}
	value, err := fromLua(returned, map[*lua.LTable]bool{})
	if err != nil {
		return healthResult{}, err
	}
	encoded, err := json.Marshal(value)
	if err != nil {
		return healthResult{}, err
	}
	var result healthResult
	if err := json.Unmarshal(encoded, &result); err != nil {
		var typeError *json.UnmarshalTypeError
		if errors.As(err, &typeError) { // an empty table (`[]`) or a field of another type
			return healthResult{}, nil
		}
		return healthResult{}, err
	}
	if !validHealth[result.Status] {
		return healthResult{Status: "Unknown", Message: invalidHealthStatus}, nil
	}
	return result, nil
}

func run(script string, object any, openLibs bool) (healthResult, error) {
	l := newState(openLibs)
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("actionParams", l.CreateTable(0, 0))
	l.SetGlobal("obj", toLua(l, object))
	fn, err := l.LoadString(script)
	if err == nil {
		l.Push(fn)
		err = l.PCall(0, lua.MultRet, nil)
	}
	var apiErr *lua.ApiError
	if errors.As(err, &apiErr) && apiErr.Type == lua.ApiErrorRun {
		apiErr.StackTrace = "" // Argo CD shows the error without Lua's stack trace
	}
	if err != nil {
		return healthResult{}, err
	}
	return health(l.Get(-1))
}

// normalize gives numbers the Go types an object read from the API server has: whole numbers
// int64, others float64 (Argo CD's conversion treats both as Lua numbers).
func normalize(value any) (any, error) {
	switch v := value.(type) {
	case json.Number:
		if i, err := v.Int64(); err == nil {
			return i, nil
		}
		return v.Float64()
	case []any:
		for i := range v {
			n, err := normalize(v[i])
			if err != nil {
				return nil, err
			}
			v[i] = n
		}
	case map[string]any:
		for key, item := range v {
			n, err := normalize(item)
			if err != nil {
				return nil, err
			}
			v[key] = n
		}
	}
	return value, nil
}

func readInput(path string) (any, error) {
	var r io.Reader = os.Stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	decoder := json.NewDecoder(r)
	decoder.UseNumber()
	var doc any
	if err := decoder.Decode(&doc); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return normalize(doc)
}

func main() {
	openLibs := flag.Bool("open-libs", false, "open every Lua library (built-in checks, useOpenLibs)")
	scriptPath := flag.String("script", "", "the health.lua to run")
	flag.Parse()
	if *scriptPath == "" || flag.NArg() > 1 {
		fmt.Fprintln(os.Stderr, "usage: argocd-lua [-open-libs] -script health.lua [FILE]")
		os.Exit(2)
	}
	script, err := os.ReadFile(*scriptPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "argocd-lua:", err)
		os.Exit(2)
	}
	input := "-"
	if flag.NArg() == 1 {
		input = flag.Arg(0)
	}
	doc, err := readInput(input)
	if err != nil {
		fmt.Fprintln(os.Stderr, "argocd-lua:", err)
		os.Exit(2)
	}
	objects, batch := doc.([]any)
	if !batch {
		objects = []any{doc}
	}
	results := make([]any, len(objects))
	failed := false
	for i, object := range objects {
		result, err := run(string(script), object, *openLibs)
		if err != nil {
			results[i] = map[string]string{"error": err.Error()}
			failed = true
			fmt.Fprintf(os.Stderr, "argocd-lua: object %d: %s\n", i, err)
			continue
		}
		results[i] = result
	}
	var out any = results
	if !batch {
		out = results[0]
	}
	encoder := json.NewEncoder(os.Stdout)
	encoder.SetIndent("", "  ")
	encoder.SetEscapeHTML(false)
	if err := encoder.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "argocd-lua:", err)
		os.Exit(1)
	}
	if failed {
		os.Exit(1)
	}
}
