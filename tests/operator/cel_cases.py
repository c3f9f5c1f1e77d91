"""The CEL rules of the CRD as a table: (name, spec, accepted by the API server).

e2e/tests/test_cel_rules.py checks every row against the local cluster's kube-apiserver (`kubectl create
--dry-run=server` with the generated CRD); the unit tests check that the operator's Python validators,
which repeat these rules for objects that never went through CEL, agree with it row by row.
"""

from __future__ import annotations

from op_testdata import minimal_spec

BKT = "s3://bkt"
PREF = [{"uri": f"{BKT}/p.jsonl", "format": "preference"}]
FEEDBACK = [{"uri": f"{BKT}/f.jsonl", "format": "feedback"}]
SEARCH_FIELDS = ("trials", "parallelism")


def search(prune: bool = False, **fields) -> dict:
    """spec.search varying the given parameters; pruning (the default median rule, which needs
    evaluation.everySteps) only when asked."""
    out = {k: fields.pop(k) for k in SEARCH_FIELDS if k in fields}
    return {"parameters": fields, **out, **({} if prune else {"pruning": {"rule": "none"}})}


def tasks(*specs: dict, **evaluation) -> dict:
    """spec.evaluation with tasks on s3://bkt/eval/, named t0, t1, ... unless given a name."""
    return {"tasks": [{"name": f"t{i}", "uri": f"{BKT}/eval/{i}.jsonl", **spec} for i, spec in enumerate(specs)],
            **evaluation}


def filters(*specs: dict, name: str = "") -> dict:
    """spec.preprocessing with content filters, named f0, f1, ... (or all `name`)."""
    return {"contentFilters": [{"name": name or f"f{i}", **spec} for i, spec in enumerate(specs)]}


CEL_CASES = [
    ("valid minimal", minimal_spec(), True),
    ("lora with full", minimal_spec(method={"type": "full", "lora": {"rank": 4}}), False),
    ("lora with lora", minimal_spec(method={"type": "lora", "lora": {"rank": 4}}), True),
    ("virtualTokens with lora", minimal_spec(method={"type": "lora", "virtualTokens": 5}), False),
    ("virtualTokens with prompt", minimal_spec(method={"type": "prompt", "virtualTokens": 5}), True),
    ("freezeLayers with lora", minimal_spec(method={"type": "lora", "freezeLayers": 2}), False),
    ("full settings with lora", minimal_spec(method={"type": "lora", "full": {"layerwiseLRDecay": 0.9}}), False),
    ("full settings with full", minimal_spec(method={"type": "full", "full": {
        "layerwiseLRDecay": 0.9, "l2sp": {"strength": 0.1}, "unfreeze": {"everySteps": 10, "floor": 1}}}), True),
    ("unfreeze with freezeLayers", minimal_spec(method={"type": "full", "freezeLayers": 1,
                                                        "full": {"unfreeze": {"everySteps": 10}}}), False),
    ("unfreeze without period", minimal_spec(method={"type": "full", "full": {"unfreeze": {}}}), False),
    ("unfreeze with two periods", minimal_spec(method={"type": "full", "full": {
        "unfreeze": {"everySteps": 10, "everyEpochs": 1}}}), False),
    ("unfreeze with deepspeed", minimal_spec(method={"type": "full", "full": {"unfreeze": {"everyEpochs": 1}}},
                                             distributed={"engine": "deepspeed"}), True),
    ("l2sp with deepspeed", minimal_spec(method={"type": "full", "full": {"l2sp": {"strength": 0.1}}},
                                         distributed={"engine": "deepspeed", "zeroStage": 3}), True),
    ("l2sp and unfreeze with deepspeed", minimal_spec(method={"type": "full", "full": {
        "l2sp": {"strength": 0.1}, "unfreeze": {"everySteps": 10}}}, distributed={"engine": "deepspeed", "zeroStage": 3}), True),
    ("layerwise decay with deepspeed", minimal_spec(method={"type": "full", "full": {"layerwiseLRDecay": 0.9}},
                                                    distributed={"engine": "deepspeed"}), True),
    ("zeroStage with ddp", minimal_spec(distributed={"engine": "ddp", "zeroStage": 2}), False),
    ("zeroStage with deepspeed", minimal_spec(distributed={"engine": "deepspeed", "zeroStage": 3, "offload": "optimizer"}), True),
    ("offload with ddp", minimal_spec(distributed={"offload": "optimizer"}), False),
    ("offload with zero 1", minimal_spec(distributed={"engine": "deepspeed", "zeroStage": 1, "offload": "optimizer"}), False),
    ("qlora no gpus", minimal_spec(method={"type": "qlora"}, resources={"gpusPerWorker": 0}), False),
    ("qlora default gpus", minimal_spec(method={"type": "qlora"}), True),
    ("no datasets no stages", minimal_spec(datasets=[]), False),
    ("combine-only job", minimal_spec(datasets=[], output={"uri": f"{BKT}/out/", "combine": {
        "adapters": [{"uri": f"{BKT}/a/", "weight": 0.5}, {"uri": f"{BKT}/b/"}], "includeTrained": False}}), True),
    ("combine including the trained adapter without datasets", minimal_spec(datasets=[], output={
        "uri": f"{BKT}/out/", "combine": {"adapters": [{"uri": f"{BKT}/a/"}]}}), False),
    ("combine after lora training", minimal_spec(output={"uri": f"{BKT}/out/", "combine": {
        "adapters": [{"uri": f"{BKT}/a/"}], "method": "svd", "svdRank": 8, "trainedWeight": 2.0}}), True),
    ("combine including a prefix adapter", minimal_spec(method={"type": "prefix"}, output={
        "uri": f"{BKT}/out/", "combine": {"adapters": [{"uri": f"{BKT}/a/"}]}}), False),
    ("combine without the trained prefix adapter", minimal_spec(method={"type": "prefix"}, output={
        "uri": f"{BKT}/out/", "combine": {"adapters": [{"uri": f"{BKT}/a/"}], "includeTrained": False}}), True),
    ("combine svdRank with cat", minimal_spec(output={"uri": f"{BKT}/out/", "combine": {
        "adapters": [{"uri": f"{BKT}/a/"}], "svdRank": 8}}), False),
    ("continue from an adapter", minimal_spec(method={"type": "dora", "adapter": {"uri": f"{BKT}/a/"}}), True),
    ("continue from an adapter with full", minimal_spec(method={"type": "full", "adapter": {"uri": f"{BKT}/a/"}}),
     False),
    ("continue from an adapter with lora settings", minimal_spec(method={
        "type": "lora", "lora": {"rank": 4}, "adapter": {"uri": f"{BKT}/a/"}}), False),
    ("continue from an adapter with virtualTokens", minimal_spec(method={
        "type": "prompt", "virtualTokens": 4, "adapter": {"uri": f"{BKT}/a/"}}), False),
    ("stages only", minimal_spec(datasets=[], stages=[{"name": "a", "datasets": [{"uri": f"{BKT}/a.jsonl"}]}]), True),
    ("dup stages", minimal_spec(datasets=[], stages=[{"name": "a", "datasets": [{"uri": f"{BKT}/a.jsonl"}]},
                                                     {"name": "a", "datasets": [{"uri": f"{BKT}/b.jsonl"}]}]), False),
    ("dpo chat", minimal_spec(objective="dpo"), False),
    ("dpo preference", minimal_spec(objective="dpo", datasets=PREF), True),
    ("dpo packing", minimal_spec(objective="dpo", datasets=PREF, preprocessing={"packing": True}), False),
    ("prompt packing", minimal_spec(method={"type": "prompt"}, preprocessing={"packing": True}), False),
    ("prefix packing", minimal_spec(method={"type": "prefix"}, preprocessing={"packing": True}), False),
    ("lora packing", minimal_spec(method={"type": "lora"}, preprocessing={"packing": True}), True),
    ("stage dpo chat", minimal_spec(datasets=[], stages=[{"name": "a", "objective": "dpo",
                                                          "datasets": [{"uri": f"{BKT}/a.jsonl", "format": "chat"}]}]), False),
    ("kto chat", minimal_spec(objective="kto"), False),
    ("kto feedback", minimal_spec(objective="kto", datasets=FEEDBACK), True),
    ("kto feedback and chat", minimal_spec(objective="kto", datasets=FEEDBACK + [{"uri": f"{BKT}/c.jsonl",
                                                                                "format": "chat"}]), False),
    ("feedback with sft", minimal_spec(datasets=FEEDBACK), False),
    ("feedback with dpo", minimal_spec(objective="dpo", datasets=FEEDBACK), False),
    ("kto packing", minimal_spec(objective="kto", datasets=FEEDBACK, preprocessing={"packing": True}), False),
    ("stage kto chat", minimal_spec(datasets=[], stages=[{"name": "a", "objective": "kto",
                                                          "datasets": [{"uri": f"{BKT}/a.jsonl", "format": "chat"}]}]), False),
    ("stage feedback sft", minimal_spec(datasets=[], stages=[{"name": "a", "datasets": FEEDBACK}]), False),
    ("stages sft then kto", minimal_spec(datasets=[], stages=[
        {"name": "a", "datasets": [{"uri": f"{BKT}/a.jsonl", "format": "chat"}]},
        {"name": "b", "objective": "kto", "datasets": FEEDBACK}]), True),
    ("ratio without compare", minimal_spec(evaluation={"compareToBase": False, "maxPerplexityRatio": 1.0}), False),
    ("validation both", minimal_spec(validation={"uri": f"{BKT}/v.jsonl", "splitRatio": 0.1}), False),
    ("bad quantity", minimal_spec(resources={"memory": "64 GB"}), False),
    ("int quantity", minimal_spec(resources={"cpu": 8, "memory": "1Gi"}), True),
    ("search values", minimal_spec(search=search(learningRate={"values": [1e-4, 3e-4]})), True),
    ("search log range", minimal_spec(search=search(learningRate={"min": 1e-5, "max": 1e-3, "scale": "log"})), True),
    ("search pruning without everySteps", minimal_spec(search=search(prune=True, loraRank={"values": [4, 8]})), False),
    ("search pruning with everySteps", minimal_spec(search=search(prune=True, loraRank={"values": [4, 8]}),
                                                    evaluation={"everySteps": 10}), True),
    ("search with stages", minimal_spec(datasets=[], stages=[{"name": "a", "datasets": [{"uri": f"{BKT}/a.jsonl"}]}],
                                        search=search(learningRate={"values": [1e-4]})), False),
    ("search values and range", minimal_spec(search=search(batchSize={"values": [8], "min": 4, "max": 16})), False),
    ("search min only", minimal_spec(search=search(batchSize={"min": 4})), False),
    ("search min above max", minimal_spec(search=search(warmupRatio={"min": 0.1, "max": 0.05})), False),
    ("search log from 0", minimal_spec(search=search(weightDecay={"min": 0.0, "max": 0.1, "scale": "log"})), False),
    ("search scale of values", minimal_spec(search=search(weightDecay={"values": [0.0, 0.1], "scale": "log"})), False),
    ("search epochs and maxSteps", minimal_spec(search=search(epochs={"values": [1, 2]}, maxSteps={"values": [10]})),
     False),
    ("search no parameters", minimal_spec(search=search()), False),
    ("search epochs", minimal_spec(search=search(epochs={"values": [1, 2]})), True),
    ("search epochs with maxSteps", minimal_spec(hyperparameters={"maxSteps": 100},
                                                 search=search(epochs={"values": [1, 2]})), False),
    ("search maxSteps with maxSteps", minimal_spec(hyperparameters={"maxSteps": 100},
                                                   search=search(maxSteps={"values": [50, 100]})), True),
    ("filter terms", minimal_spec(preprocessing=filters({"type": "terms", "terms": ["bad word"]})), True),
    ("filter terms file", minimal_spec(preprocessing=filters({"type": "terms", "termsUri": f"{BKT}/terms.txt",
                                                              "action": "flag", "fields": "prompt"})), True),
    ("filter terms without terms", minimal_spec(preprocessing=filters({"type": "terms"})), False),
    ("filter regex", minimal_spec(preprocessing=filters({"type": "regex", "patterns": ["[0-9]{3}-[0-9]{4}"]})), True),
    ("filter regex without patterns", minimal_spec(preprocessing=filters({"type": "regex"})), False),
    ("filter regex with terms", minimal_spec(preprocessing=filters({"type": "regex", "patterns": ["x"],
                                                                    "terms": ["y"]})), False),
    ("filter classifier", minimal_spec(preprocessing=filters({"type": "classifier", "modelUri": f"{BKT}/tox/",
                                                              "label": "toxic", "threshold": 0.8})), True),
    ("filter classifier without label", minimal_spec(preprocessing=filters({"type": "classifier",
                                                                            "modelUri": f"{BKT}/tox/"})), False),
    ("filter threshold with terms", minimal_spec(preprocessing=filters({"type": "terms", "terms": ["x"],
                                                                        "threshold": 0.5})), False),
    ("filter names repeat", minimal_spec(preprocessing=filters({"type": "terms", "terms": ["x"]},
                                                               {"type": "regex", "patterns": ["y"]}, name="same")), False),
    ("search parallelism above trials", minimal_spec(search=search(trials=2, parallelism=3,
                                                                   learningRate={"values": [1e-4]})), False),
    ("task with a gate on its metric", minimal_spec(evaluation=tasks({"gate": {"metric": "rougeL", "minScore": 0.3}})),
     True),
    ("task gate on a metric it does not score",
     minimal_spec(evaluation=tasks({"metrics": ["bleu"], "gate": {"metric": "rougeL", "minScore": 0.3}})), False),
    ("task gate on one of its checks", minimal_spec(evaluation=tasks(
        {"checks": [{"name": "cites", "pattern": "plan [a-z]+"}], "gate": {"metric": "cites", "minGain": 0.1}})), True),
    ("task gate on an unknown check", minimal_spec(evaluation=tasks({"gate": {"metric": "cites", "minScore": 0.5}})),
     False),
    ("task gate without a limit", minimal_spec(evaluation=tasks({"gate": {"metric": "bleu"}})), False),
    ("task scoring nothing", minimal_spec(evaluation=tasks({"metrics": []})), False),
    ("task scoring nothing, checks empty", minimal_spec(evaluation=tasks({"metrics": [], "checks": []})), False),
    ("task scoring only a check", minimal_spec(evaluation=tasks(
        {"metrics": [], "checks": [{"name": "c", "contains": "x"}]})), True),
    ("task scoring one metric", minimal_spec(evaluation=tasks({"metrics": ["exactMatch"]})), True),
    ("task names repeat", minimal_spec(evaluation=tasks({"name": "qa"}, {"name": "qa"})), False),
    ("check with contains and pattern", minimal_spec(evaluation=tasks(
        {"checks": [{"name": "c", "contains": "x", "pattern": "y"}]})), False),
    ("check with neither", minimal_spec(evaluation=tasks({"checks": [{"name": "c"}]})), False),
    ("check named like a metric", minimal_spec(evaluation=tasks({"checks": [{"name": "bleu", "contains": "x"}]})),
     False),
    ("check names repeat", minimal_spec(evaluation=tasks(
        {"checks": [{"name": "c", "contains": "x"}, {"name": "c", "contains": "y"}]})), False),
    ("minGain without compareToBase", minimal_spec(evaluation=tasks(
        {"gate": {"metric": "bleu", "minGain": 0.1}}, compareToBase=False)), False),
    ("minScore without compareToBase", minimal_spec(evaluation=tasks(
        {"gate": {"metric": "bleu", "minScore": 0.1}}, compareToBase=False)), True),
    ("evaluate-only job", minimal_spec(datasets=[], method={"type": "lora", "adapter": {"uri": f"{BKT}/adapter/"}},
                                       evaluation=tasks({}, only=True)), True),
    ("evaluate-only without an adapter", minimal_spec(datasets=[], evaluation=tasks({}, only=True)), False),
    ("evaluate-only without tasks or general", minimal_spec(
        datasets=[], method={"type": "lora", "adapter": {"uri": f"{BKT}/adapter/"}}, evaluation={"only": True}), False),
    ("evaluate-only with datasets", minimal_spec(method={"type": "lora", "adapter": {"uri": f"{BKT}/adapter/"}},
                                                 evaluation=tasks({}, only=True)), False),
    ("evaluate-only with a perplexity gate", minimal_spec(
        datasets=[], method={"type": "lora", "adapter": {"uri": f"{BKT}/adapter/"}},
        evaluation=tasks({}, only=True, maxPerplexityRatio=1.0)), False),
    ("evaluate-only with merge", minimal_spec(
        datasets=[], method={"type": "lora", "adapter": {"uri": f"{BKT}/adapter/"}}, evaluation=tasks({}, only=True),
        output={"uri": "s3://team-a/models/x/", "merge": True}), False),
    ("evaluate-only of a whole model", minimal_spec(
        datasets=[], method={"type": "full"},
        evaluation=tasks({}, only=True, candidateModel={"uri": f"{BKT}/models/merged/"})), True),
    ("evaluate-only with two candidates", minimal_spec(
        datasets=[], method={"type": "lora", "adapter": {"uri": f"{BKT}/adapter/"}},
        evaluation=tasks({}, only=True, candidateModel={"uri": f"{BKT}/models/merged/"})), False),
    ("evaluate-only of a whole model with an adapter method", minimal_spec(
        datasets=[], method={"type": "lora"},
        evaluation=tasks({}, only=True, candidateModel={"uri": f"{BKT}/models/merged/"})), False),
    ("a candidate model in a training job", minimal_spec(
        method={"type": "full"}, evaluation=tasks({}, candidateModel={"uri": f"{BKT}/models/merged/"})), False),
    ("forgetting check with a limit", minimal_spec(evaluation={
        "general": {"uri": f"{BKT}/eval/general.jsonl", "maxPerplexityRise": 0.1}}), True),
]
