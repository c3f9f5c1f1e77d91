// kstatus: what sigs.k8s.io/cli-utils' kstatus (used by Flux, kpt and Helm 4's --wait) computes for
// Kubernetes objects, for the tests (built by `python -m e2e.localcluster.build kstatus`).
//
//	kstatus [FILE ...]    (no FILE, or "-": standard input)
//
// Input: JSON or YAML; one object, several YAML documents, a JSON array or a List (kind *List with
// items), as `kubectl get -o json` prints them. Output: a JSON array with one entry per object, in
// input order: its identity, and the status, message and conditions of status.Compute, or error.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type condition struct {
	Type    string `json:"type"`
	Status  string `json:"status"`
	Reason  string `json:"reason"`
	Message string `json:"message"`
}

type result struct {
	APIVersion string      `json:"apiVersion"`
	Kind       string      `json:"kind"`
	Namespace  string      `json:"namespace"`
	Name       string      `json:"name"`
	Status     string      `json:"status,omitempty"`
	Message    string      `json:"message"`
	Conditions []condition `json:"conditions"`
	Error      string      `json:"error,omitempty"`
}

// decodeObjects returns the objects of one input, with Lists and JSON arrays flattened. Whole
// numbers become int64, as in objects read from the API server (kstatus reads metadata.generation
// and status.observedGeneration as int64).
func decodeObjects(r io.Reader) ([]map[string]any, error) {
	decoder := utilyaml.NewYAMLOrJSONDecoder(r, 4096)
	var objects []map[string]any
	for {
		var raw json.RawMessage
		if err := decoder.Decode(&raw); err != nil {
			if errors.Is(err, io.EOF) {
				return objects, nil
			}
			return nil, err
		}
		var doc any
		if len(raw) > 0 {
			if err := utiljson.Unmarshal(raw, &doc); err != nil {
				return nil, err
			}
		}
		flat, err := flatten(doc)
		if err != nil {
			return nil, err
		}
		objects = append(objects, flat...)
	}
}

func flatten(doc any) ([]map[string]any, error) {
	switch v := doc.(type) {
	case nil:
		return nil, nil // an empty YAML document
	case []any:
		var out []map[string]any
		for _, item := range v {
			flat, err := flatten(item)
			if err != nil {
				return nil, err
			}
			out = append(out, flat...)
		}
		return out, nil
	case map[string]any:
		kind, _ := v["kind"].(string)
		if items, ok := v["items"].([]any); ok && strings.HasSuffix(kind, "List") {
			return flatten(items)
		}
		return []map[string]any{v}, nil
	default:
		return nil, fmt.Errorf("not a Kubernetes object: %T", doc)
	}
}

func compute(object map[string]any) result {
	u := &unstructured.Unstructured{Object: object}
	out := result{
		APIVersion: u.GetAPIVersion(), Kind: u.GetKind(), Namespace: u.GetNamespace(), Name: u.GetName(),
		Conditions: []condition{},
	}
	res, err := status.Compute(u)
	if err != nil {
		out.Error = err.Error()
		return out
	}
	out.Status, out.Message = string(res.Status), res.Message
	for _, c := range res.Conditions {
		out.Conditions = append(out.Conditions, condition{
			Type: string(c.Type), Status: string(c.Status), Reason: c.Reason, Message: c.Message,
		})
	}
	return out
}

func readAll(paths []string) ([]map[string]any, error) {
	if len(paths) == 0 {
		paths = []string{"-"}
	}
	var objects []map[string]any
	for _, path := range paths {
		var r io.Reader = os.Stdin
		if path != "-" {
			f, err := os.Open(path)
			if err != nil {
				return nil, err
			}
			defer f.Close()
			r = f
		}
		decoded, err := decodeObjects(r)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		objects = append(objects, decoded...)
	}
	return objects, nil
}

func main() {
	objects, err := readAll(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(2)
	}
	results := make([]result, 0, len(objects))
	for _, object := range objects {
		results = append(results, compute(object))
	}
	encoder := json.NewEncoder(os.Stdout)
	encoder.SetIndent("", "  ")
	if err := encoder.Encode(results); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus:", err)
		os.Exit(1)
	}
}
