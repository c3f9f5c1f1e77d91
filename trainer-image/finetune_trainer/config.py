"""The TrainerConfig document: the one contract between the operator and the trainer.

The operator renders it (into the sandbox's ConfigMap) from a FineTuneJob; the trainer reads it.
The spec sections (model, datasets, method, ...) are the very models the FineTuneJob CRD schema is
generated from, so the API a user writes and the document the trainer reads cannot drift apart.

This module imports nothing heavier than pydantic: the operator imports it too.
Rules that need more than one field are CEL rules (`x-kubernetes-validations`) so the API server
rejects a bad object; `validate_cross_field_rules` applies the same rules in Python for documents
that never went through an API server (a TrainerConfig file given to the trainer by hand).
"""

from __future__ import annotations

import math
import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

TRAINER_CONFIG_API_VERSION = "finetune.dev/trainer-config/v1"

S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
S3Uri = Annotated[
    str,
    Field(pattern=S3_URI_PATTERN, max_length=1024, description="An s3://bucket/key URI."),
]
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """`x-kubernetes-validations` for a model's schema: (rule, message) pairs."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


class ApiModel(BaseModel):
    """Base of every API model: camelCase field names as written, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, use_enum_values=True)


class DatasetFormat(str, Enum):
    text = "text"
    instruction = "instruction"
    chat = "chat"
    preference = "preference"
    feedback = "feedback"


class MethodType(str, Enum):
    full = "full"
    lora = "lora"
    qlora = "qlora"
    dora = "dora"
    prefix = "prefix"
    prompt = "prompt"
    ia3 = "ia3"


class Objective(str, Enum):
    causal_lm = "causal-lm"
    sft = "sft"
    dpo = "dpo"
    kto = "kto"


class Scheduler(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


class Engine(str, Enum):
    ddp = "ddp"
    deepspeed = "deepspeed"


class Offload(str, Enum):
    none = "none"
    optimizer = "optimizer"
    optimizer_and_params = "optimizer-and-params"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ModelSource(ApiModel):
    uri: S3Uri = Field(
        description="S3 prefix of the base model in Hugging Face format (config.json, tokenizer, "
        "safetensors weights), or of a folder holding a GGUF file named by ggufFile."
    )
    ggufFile: str | None = Field(
        default=None,
        max_length=255,
        description="Name of a GGUF file under uri to load the model and tokenizer from (optional).",
    )


class Dataset(ApiModel):
    uri: S3Uri = Field(description="S3 URI of a JSON Lines file (optionally .gz) or of a prefix of such files.")
    format: DatasetFormat = Field(
        default=DatasetFormat.text,
        description="Row format. text: {text}; instruction: {instruction, input?, output}; "
        "chat: {messages: [{role, content}]}; preference: {prompt, chosen, rejected}; feedback: {prompt, "
        "completion, label: true (desirable, thumbs up) | false (undesirable, thumbs down)}, for objective kto.",
    )
    weight: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        description="Relative sampling weight when several datasets are mixed (multi-task).",
    )


class Validation(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel(
            ("!(has(self.uri) && has(self.splitRatio) && self.splitRatio > 0.0)",
             "validation: set either uri or splitRatio, not both"),
        )
    )
    splitRatio: float | None = Field(
        default=None,
        ge=0,
        le=0.5,
        description="Fraction of the training rows held out for validation (used when uri is not set; "
        "the trainer defaults to 0.05).",
    )
    uri: S3Uri | None = Field(default=None, description="S3 URI of a separate validation file, same format as the first dataset.")


class ContentFilterType(str, Enum):
    terms = "terms"
    regex = "regex"
    classifier = "classifier"


class ContentFilterFields(str, Enum):
    prompt = "prompt"
    answer = "answer"
    both = "both"


class ContentFilterAction(str, Enum):
    drop = "drop"
    flag = "flag"


MAX_CONTENT_FILTERS = 16
# Fields allowed only with one filter type (the CEL rules and ContentFilter.problems read this).
CONTENT_FILTER_FIELDS_OF_TYPE = {"terms": "terms", "termsUri": "terms", "patterns": "regex", "modelUri": "classifier",
                                 "label": "classifier", "threshold": "classifier"}


class ContentFilter(ApiModel):
    """One filter of preprocessing.contentFilters: rows whose prompt or answer matches it are dropped or
    flagged before training."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("self.type != 'terms' || has(self.terms) || has(self.termsUri)",
             "contentFilters[]: type terms needs terms or termsUri"),
            ("self.type != 'regex' || has(self.patterns)", "contentFilters[]: type regex needs patterns"),
            ("self.type != 'classifier' || (has(self.modelUri) && has(self.label))",
             "contentFilters[]: type classifier needs modelUri and label"),
            *((f"!has(self.{name}) || self.type == '{kind}'",
               f"contentFilters[].{name} is only allowed with type {kind}")
              for name, kind in CONTENT_FILTER_FIELDS_OF_TYPE.items()),
        )
    )
    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=40,
                      description="Filter name (a DNS label), unique in the list; the data report counts rows by it.")
    type: ContentFilterType = Field(
        description="terms: a list of terms; regex: regular expressions; classifier: a Hugging Face "
        "text-classification model.")
    terms: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        default=None, min_length=1, max_length=1000,
        description="Terms or phrases (terms only), matched word by word: ignoring case, whole words only, "
        "punctuation and spacing between the words ignored.")
    termsUri: S3Uri | None = Field(
        default=None,
        description="S3 URI of a UTF-8 text file of more terms, one per line; blank lines and lines starting "
        "with # are skipped (terms only; at most 16 MiB).")
    patterns: list[Annotated[str, Field(min_length=1, max_length=512)]] | None = Field(
        default=None, min_length=1, max_length=32,
        description="Python regular expressions (re syntax; regex only), searched anywhere in the text; a text "
        "matches when any pattern does. Refused when one does not compile or nests unbounded repetitions, as in "
        "(a+)+ (catastrophic backtracking: use a possessive a++ or an atomic group (?>...)). A long text is "
        "searched in windows of 10000 characters that overlap by 500, which bounds the cost of one search.")
    modelUri: S3Uri | None = Field(
        default=None,
        description="S3 prefix of a Hugging Face sequence-classification model: config.json, tokenizer and "
        "weights (classifier only). Every process scores every row, batched, on its GPU (or CPU), before training.")
    label: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="The model's label (its config.id2label) whose probability is compared with threshold "
        "(classifier only, required).")
    threshold: float | None = Field(
        default=None, ge=0, le=1,
        description="A text matches when the probability of label is at least this (classifier only; the "
        "trainer defaults to 0.5). A softmax over the labels, or a sigmoid per label for a multi-label model.")
    fields: ContentFilterFields = Field(
        default=ContentFilterFields.both,
        description="What is examined. prompt: instruction and input, system, user and tool turns, the prompt of "
        "a preference or feedback row; answer: output, assistant turns, completion, the chosen answer, the "
        "completion of a desirable (label true) feedback row; both. A text row is examined whole whatever this "
        "says; the rejected answer of a preference row and the completion of an undesirable (label false) "
        "feedback row never are (they are the behaviour trained away from, which KTO needs; their prompts are "
        "examined).")
    action: ContentFilterAction = Field(
        default=ContentFilterAction.drop,
        description="drop: remove the row; flag: keep it. Either way the data report counts the rows per filter, "
        "with up to 3 examples (PII redacted, cut to 200 characters).")

    @field_validator("terms")
    @classmethod
    def terms_have_words(cls, terms: list[str] | None) -> list[str] | None:
        for i, term in enumerate(terms or []):
            if not re.search(r"\w", term):
                raise ValueError(f"terms[{i}]: {term!r} has no letter or digit (terms are matched word by word)")
        return terms

    @field_validator("patterns")
    @classmethod
    def patterns_compile_and_cannot_backtrack_catastrophically(cls, patterns: list[str] | None) -> list[str] | None:
        for i, pattern in enumerate(patterns or []):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"patterns[{i}]: {pattern!r} is not a valid regular expression: {e}") from None
            if cls.nests_unbounded_repeats(pattern):
                raise ValueError(f"patterns[{i}]: {pattern!r} nests unbounded repetitions (as in (a+)+), whose "
                                 "backtracking can take exponential time; use a possessive quantifier (a++) or an "
                                 "atomic group (?>...)")
        return patterns

    @staticmethod
    def nests_unbounded_repeats(pattern: str) -> bool:
        """An unbounded repeat (*, +, {n,}) inside another: the shape of catastrophic backtracking. Possessive
        repeats and atomic groups never backtrack into themselves, so their bodies start afresh."""
        from re import _constants as c, _parser

        def walk(sub, inside: bool) -> bool:
            for op, av in sub:
                if op in (c.MAX_REPEAT, c.MIN_REPEAT):
                    unbounded = av[1] == c.MAXREPEAT
                    if (unbounded and inside) or walk(av[2], inside or unbounded):
                        return True
                elif op == c.POSSESSIVE_REPEAT and walk(av[2], False):
                    return True
                elif op == c.ATOMIC_GROUP and walk(av, False):
                    return True
                elif op == c.SUBPATTERN and walk(av[-1], inside):
                    return True
                elif op == c.BRANCH and any(walk(branch, inside) for branch in av[1]):
                    return True
                elif op in (c.ASSERT, c.ASSERT_NOT) and walk(av[1], inside):
                    return True
                elif op == c.GROUPREF_EXISTS and any(b is not None and walk(b, inside) for b in av[1:]):
                    return True
            return False

        return walk(_parser.parse(pattern), False)

    def problems(self) -> list[str]:
        """The CEL rules above, in Python (for documents that never went through an API server)."""
        out = []
        if self.type == "terms" and self.terms is None and self.termsUri is None:
            out.append("type terms needs terms or termsUri")
        if self.type == "regex" and self.patterns is None:
            out.append("type regex needs patterns")
        if self.type == "classifier" and (self.modelUri is None or self.label is None):
            out.append("type classifier needs modelUri and label")
        for name, kind in CONTENT_FILTER_FIELDS_OF_TYPE.items():
            if getattr(self, name) is not None and self.type != kind:
                out.append(f"{name} is only allowed with type {kind}, not {self.type}")
        return out


class MultiTaskStrategy(str, Enum):
    mix = "mix"
    interleave = "interleave"


class MultiTask(ApiModel):
    """How the datasets of the job (and of each stage) are combined when there are several."""

    strategy: MultiTaskStrategy = Field(
        default=MultiTaskStrategy.mix,
        description="mix: the datasets' rows shuffled together, so a micro-batch holds rows of several datasets. "
        "interleave: each micro-batch comes from one dataset (every process the same one); the datasets take "
        "turns in proportion to their shares, in a seeded order that a resumed run continues exactly, and "
        "progress.json reports each dataset's training loss (datasetLosses). With packing, each dataset is "
        "packed on its own. Either way a step's loss stays normalised over all its target tokens.")
    temperature: float | None = Field(
        default=None, ge=0.1, le=100,
        description="Shares by temperature-scaled size: a dataset's share of the rows (mix) or of the "
        "micro-batches (interleave) is proportional to weight x rows^(1/temperature): 1 follows the sizes, larger "
        "values flatten toward uniform so small tasks are not drowned out (mT5 used 3.3). Not set: shares in "
        "proportion to weight alone.")


class Preprocessing(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel(
            ("!has(self.contentFilters) || self.contentFilters.all(f, self.contentFilters.exists_one(g, g.name == f.name))",
             "preprocessing.contentFilters: filter names must be unique"),
        )
    )
    maxSeqLength: int = Field(default=2048, ge=16, le=131072, description="Longest tokenized sequence; longer rows are truncated.")
    minTokens: int = Field(default=2, ge=1, le=131072, description="Rows with fewer tokens than this are dropped (length filter).")
    packing: bool = Field(default=False, description="Padding-free packing: rows placed best-fit into sequences of at most maxSeqLength tokens, each keeping its own positions (no attention across rows); not with objective dpo or kto or method prefix/prompt; validation is never packed.")
    deduplicate: bool = Field(default=True, description="Drop exact and normalised (case, whitespace, punctuation) duplicate rows.")
    redactPII: bool = Field(default=False, description="Replace emails, phone numbers, IP addresses, card numbers and keys with placeholders.")
    contentFilters: list[ContentFilter] = Field(
        default_factory=list, max_length=MAX_CONTENT_FILTERS,
        description="Content filters, applied in order to every row of every dataset (and of validation.uri) "
        "before PII redaction, de-duplication and tokenization; a row dropped by one filter is not seen by the next. "
        "The data report counts what each filter dropped or flagged.")
    multiTask: MultiTask = Field(
        default_factory=MultiTask,
        description="How several datasets are combined (the job's, and each stage's): mixed row by row (the "
        "default) or interleaved micro-batch by micro-batch, shares by weight or by temperature-scaled size.")

    def content_filter_problems(self) -> list[str]:
        """The rules of contentFilters (each filter's and unique names), as `contentFilters[i]...: message`."""
        out, names = [], [f.name for f in self.contentFilters]
        for i, content_filter in enumerate(self.contentFilters):
            out += [f"contentFilters[{i}]: {p}" for p in content_filter.problems()]
            if names.index(content_filter.name) != i:
                out.append(f"contentFilters[{i}].name: {content_filter.name!r} is already used by an earlier filter")
        return out


class LoraSettings(ApiModel):
    rank: int = Field(default=16, ge=1, le=1024, description="Rank r of the low-rank update.")
    alpha: float = Field(default=32, gt=0, le=4096, description="Scaling numerator: the update is scaled by alpha / rank.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    targetModules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list,
        max_length=64,
        description="Module names to adapt (for example q_proj, v_proj); empty means every linear layer "
        "of the transformer blocks.",
    )


class AnchorDevice(str, Enum):
    accelerator = "accelerator"
    cpu = "cpu"


class GradualUnfreezing(ApiModel):
    """Gradual unfreezing (ULMFiT): the top blocks train first, lower blocks are released on a schedule."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("has(self.everySteps) != has(self.everyEpochs)",
             "method.full.unfreeze: set exactly one of everySteps and everyEpochs"),
        )
    )
    startTopBlocks: int = Field(default=1, ge=1, le=1024,
                                description="Transformer blocks trainable from the first step, counted from the top "
                                "(the output side); the output head and final norm always train.")
    blocksPerRelease: int = Field(default=1, ge=1, le=1024, description="Blocks released (made trainable) at each release.")
    everySteps: int | None = Field(default=None, ge=1, le=10_000_000,
                                   description="Release blocks every N optimizer steps, counted over the whole run "
                                   "(all stages).")
    everyEpochs: int | None = Field(default=None, ge=1, le=1000,
                                    description="Release blocks every N epochs (1: at every epoch start after the "
                                    "first), counted over the whole run (all stages).")
    floor: int = Field(default=0, ge=0, le=1024,
                       description="The lowest N blocks are never released; the input embeddings are released with "
                       "the lowest block, so only when floor is 0 (tied embeddings always train).")


class L2SPSettings(ApiModel):
    strength: float = Field(gt=0, le=1000,
                            description="Penalty strength alpha: the loss gains alpha * sum ||w - w0||^2 over the "
                            "trained weights, w0 the base model's.")
    anchorDevice: AnchorDevice = Field(
        default=AnchorDevice.accelerator,
        description="Where the copy of the base weights w0 lives: accelerator (next to the weights the optimizer "
        "steps: GPU memory, or host memory under DeepSpeed's optimizer offload) or cpu (host memory; copied to the "
        "GPU one tensor at a time at every step).")


class FullSettings(ApiModel):
    unfreeze: GradualUnfreezing | None = Field(
        default=None, description="Gradual unfreezing (not with freezeLayers: use floor). Under DeepSpeed ZeRO the blocks "
        "not released yet still hold fp32 master weights (partitioned), and no optimizer moments until released.")
    l2sp: L2SPSettings | None = Field(
        default=None, description="L2-SP: stay close to the base weights (DDP: each rank keeps a copy of the "
        "trained weights; DeepSpeed ZeRO: each rank anchors only its partition of the fp32 master weights).")
    layerwiseLRDecay: float | None = Field(
        default=None, gt=0, le=1,
        description="Layer-wise learning-rate decay d: block i of L trains at learningRate * d^(L-1-i), the input "
        "embeddings at learningRate * d^L, the output head and final norm (and embeddings tied to the head) at "
        "learningRate.")


class AdapterSource(ApiModel):
    uri: S3Uri = Field(
        description="S3 prefix of a PEFT adapter (adapter_config.json and weights, as this operator writes to "
        "<output.uri>adapter/) trained on the same base model: training continues from it instead of a fresh "
        "adapter (continual / iterative fine-tuning). Its peft_type must match method.type and its modules and "
        "shapes must fit the base model; an adapter this operator wrote names its base model (finetune-base.json, "
        "a digest of the base's files) and is refused on another one. Its own settings (rank, targets, virtual "
        "tokens) are kept.")


class Method(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel(
            ("!has(self.adapter) || self.type != 'full'",
             "method.adapter is only allowed with an adapter method (not full)"),
            ("!has(self.adapter) || (!has(self.lora) && !has(self.virtualTokens))",
             "method.adapter keeps the adapter's own settings: do not set method.lora or method.virtualTokens"),
            ("!has(self.lora) || self.type in ['lora', 'qlora', 'dora']",
             "method.lora is only allowed with method.type lora, qlora or dora"),
            ("!has(self.virtualTokens) || self.type in ['prefix', 'prompt']",
             "method.virtualTokens is only allowed with method.type prefix or prompt"),
            ("!has(self.freezeLayers) || self.type == 'full'",
             "method.freezeLayers is only allowed with method.type full"),
            ("!has(self.full) || self.type == 'full'", "method.full is only allowed with method.type full"),
            ("!has(self.full) || !has(self.full.unfreeze) || !has(self.freezeLayers)",
             "method.full.unfreeze replaces method.freezeLayers: set unfreeze.floor instead"),
        )
    )
    type: MethodType = Field(default=MethodType.lora, description="Fine-tuning method: full|lora|qlora|dora|prefix|prompt|ia3.")
    lora: LoraSettings | None = Field(default=None, description="LoRA settings (lora, qlora and dora only).")
    virtualTokens: int | None = Field(
        default=None, ge=1, le=512, description="Number of virtual tokens (prefix and prompt only; the trainer defaults to 20)."
    )
    freezeLayers: int | None = Field(
        default=None, ge=0, le=1024, description="Keep the lowest N transformer blocks and the embeddings frozen (full only)."
    )
    full: FullSettings | None = Field(
        default=None, description="Strategies of full fine-tuning: gradual unfreezing, L2-SP, layer-wise learning "
        "rates (full only).")
    adapter: AdapterSource | None = Field(
        default=None, description="Continue from an existing adapter in S3 instead of a fresh one (every method "
        "but full).")


class Hyperparameters(ApiModel):
    epochs: int = Field(default=1, ge=1, le=1000, description="Passes over the training data (ignored when maxSteps > 0).")
    learningRate: float = Field(default=2.0e-4, gt=0, le=1, description="Peak learning rate of AdamW.")
    batchSize: int = Field(default=8, ge=1, le=4096, description="Micro-batch size per process.")
    gradientAccumulationSteps: int = Field(default=1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step.")
    warmupRatio: float = Field(default=0.03, ge=0, le=1, description="Fraction of the steps spent in linear warm-up.")
    scheduler: Scheduler = Field(default=Scheduler.cosine, description="Learning-rate schedule after warm-up.")
    weightDecay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    maxGradNorm: float = Field(default=1.0, ge=0, le=1000, description="Gradient clipping norm (0 disables clipping).")
    maxSteps: int = Field(default=0, ge=0, le=10_000_000, description="Stop after this many optimizer steps; 0 means run the epochs.")
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Random seed for initialisation, shuffling and dropout.")
    dpoBeta: float = Field(default=0.1, gt=0, le=10, description="DPO temperature beta (dpo objective only).")
    ktoBeta: float = Field(default=0.1, gt=0, le=10, description="KTO temperature beta (kto objective only).")
    desirableWeight: float = Field(
        default=1.0, gt=0, le=100,
        description="KTO weight of the desirable (label true) rows' losses (kto objective only); with unbalanced "
        "feedback keep desirableWeight x desirable rows / (undesirableWeight x undesirable rows) within 1 to 4/3.")
    undesirableWeight: float = Field(default=1.0, gt=0, le=100,
                                     description="KTO weight of the undesirable (label false) rows' losses (kto objective only).")


class Stage(ApiModel):
    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=40, description="Stage name (a DNS label), unique in the list.")
    datasets: list[Dataset] = Field(min_length=1, max_length=32, description="Datasets of this stage.")
    objective: Objective = Field(default=Objective.sft, description="Training objective of this stage.")
    hyperparameters: Hyperparameters | None = Field(
        default=None, description="Hyperparameters of this stage; the job's hyperparameters when not set."
    )


class Distributed(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel(
            ("!has(self.zeroStage) || self.engine == 'deepspeed'", "distributed.zeroStage is only allowed with engine deepspeed"),
            ("self.offload == 'none' || self.engine == 'deepspeed'", "distributed.offload needs engine deepspeed"),
            ("self.offload == 'none' || !has(self.zeroStage) || self.zeroStage >= 2",
             "distributed.offload needs zeroStage 2 or 3"),
        )
    )
    engine: Engine = Field(default=Engine.ddp, description="ddp: torch DistributedDataParallel; deepspeed: DeepSpeed ZeRO.")
    zeroStage: int | None = Field(default=None, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3 (deepspeed only; the trainer defaults to 2).")
    offload: Offload = Field(default=Offload.none, description="DeepSpeed CPU offload: none|optimizer|optimizer-and-params.")
    precision: Precision = Field(default=Precision.auto, description="auto: bf16 on GPUs that support it, fp32 on CPU.")
    gradientCheckpointing: bool = Field(default=False, description="Recompute activations in the backward pass to save memory.")


class Checkpoint(ApiModel):
    uri: S3Uri | None = Field(default=None, description="S3 prefix for checkpoints; output.uri + 'checkpoints/' when not set.")
    everySteps: int = Field(default=200, ge=1, le=10_000_000, description="Save a checkpoint every N optimizer steps.")
    keep: int = Field(default=3, ge=1, le=100, description="Keep the newest N complete checkpoints.")
    preemptionGraceSeconds: int = Field(
        default=120, ge=10, le=3600,
        description="On preemption or eviction (SIGTERM) the trainer finishes its current step, saves a checkpoint "
        "and exits; the pods' terminationGracePeriodSeconds. Allow one step plus one checkpoint save.")


class CombinationMethod(str, Enum):
    linear = "linear"
    cat = "cat"
    svd = "svd"


class CombineInput(ApiModel):
    uri: S3Uri = Field(description="S3 prefix of a LoRA adapter (PEFT format, not DoRA) of the same base model.")
    weight: float = Field(default=1.0, ge=-100, le=100,
                          description="Weight of this adapter's update in the combination (negative subtracts it).")


class AdapterCombination(ApiModel):
    """LoRA adapters merged by weight into one (PEFT's add_weighted_adapter), written to <output.uri>combined/."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("!has(self.svdRank) || (has(self.method) && self.method == 'svd')",
             "output.combine.svdRank is only allowed with method svd"),
        )
    )
    adapters: list[CombineInput] = Field(min_length=1, max_length=16,
                                         description="The LoRA adapters to combine, with their weights.")
    method: CombinationMethod = Field(
        default=CombinationMethod.cat,
        description="cat: the adapters side by side (rank = sum of ranks); the update is exactly the weighted sum "
        "of the adapters' updates. svd: the weighted sum of the updates, factored back to rank svdRank by SVD "
        "(exact when svdRank >= the sum of ranks). linear: the weighted sums of the A and of the B matrices at the "
        "common rank (all ranks equal); smaller, but not the sum of the updates (cross terms), meaningful only for "
        "adapters trained from the same start.")
    svdRank: int | None = Field(default=None, ge=1, le=4096,
                                description="Rank of the combined adapter (svd only; the trainer defaults to the sum of "
                                "the ranks).")
    includeTrained: bool = Field(
        default=True,
        description="Include this job's trained adapter (method lora or qlora) with weight trainedWeight. False with "
        "no datasets and no stages: a combine-only job (no training; hyperparameters and evaluation unused).")
    trainedWeight: float = Field(default=1.0, ge=-100, le=100,
                                 description="Weight of the trained adapter in the combination (with includeTrained).")


class Output(ApiModel):
    uri: S3Uri = Field(description="S3 prefix for the adapter, merged model, model card, evaluation and progress.")
    merge: bool = Field(default=False, description="Also write the base model with the adapter merged in (safetensors).")
    combine: AdapterCombination | None = Field(
        default=None,
        description="Combine LoRA adapters by weight into one adapter written to <output.uri>combined/, after "
        "training or as a job of its own.")


class TaskFormat(str, Enum):
    instruction = "instruction"
    chat = "chat"


class TaskMetric(str, Enum):
    exactMatch = "exactMatch"
    tokenF1 = "tokenF1"
    rougeL = "rougeL"
    bleu = "bleu"


MAX_EVALUATION_TASKS = 8
MAX_ANSWER_CHECKS = 16


class AnswerCheck(ApiModel):
    """A domain check on each generated answer; its score is the share of answers that pass."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("has(self.contains) != has(self.pattern)", "checks[]: set exactly one of contains and pattern"),
            ("self.name != 'bleu'", "checks[].name: bleu is the name of a metric"),
        )
    )
    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=40,
                      description="Check name (a DNS label), unique in the task; a gate may name it as its metric.")
    contains: str | None = Field(default=None, min_length=1, max_length=256,
                                 description="The answer passes when it contains this text.")
    pattern: str | None = Field(
        default=None, min_length=1, max_length=512,
        description="The answer passes when this Python regular expression matches anywhere in it (refused when it "
        "does not compile or nests unbounded repetitions, as content filters do).")
    ignoreCase: bool = Field(default=True, description="Compare ignoring case.")

    @field_validator("pattern")
    @classmethod
    def pattern_compiles_and_cannot_backtrack_catastrophically(cls, pattern: str | None) -> str | None:
        if pattern is None:
            return None
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{pattern!r} is not a valid regular expression: {e}") from None
        if ContentFilter.nests_unbounded_repeats(pattern):
            raise ValueError(f"{pattern!r} nests unbounded repetitions (as in (a+)+), whose backtracking can take "
                             "exponential time; use a possessive quantifier (a++) or an atomic group (?>...)")
        return pattern


class TaskGate(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel(
            ("has(self.minScore) || has(self.minGain)", "gate: set minScore, minGain or both"),
        )
    )
    metric: str = Field(min_length=1, max_length=40,
                        description="A metric of the task (exactMatch, tokenF1, rougeL, bleu) or the name of one of "
                        "its checks.")
    minScore: float | None = Field(default=None, ge=0, le=1,
                                   description="Fail the run when the tuned model's score is below this.")
    minGain: float | None = Field(
        default=None, ge=-1, le=1,
        description="Fail the run when tuned score - base score is below this (needs evaluation.compareToBase).")


NOTHING_SCORED = "a task needs at least one metric or one check: with metrics [] and no checks nothing is scored"


class EvaluationTask(ApiModel):
    """Held-out prompts with reference answers: the base and the tuned model answer them (greedy) and the
    answers are scored against the references."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("!has(self.checks) || self.checks.all(c, self.checks.exists_one(d, d.name == c.name))",
             "checks: names must be unique in the task"),
            ("!has(self.gate) || (has(self.metrics) ? self.gate.metric in self.metrics : "
             "self.gate.metric in ['exactMatch', 'tokenF1', 'rougeL', 'bleu']) || "
             "(has(self.checks) && self.checks.exists(c, c.name == self.gate.metric))",
             "gate.metric must be one of the task's metrics or checks"),
            ("!has(self.metrics) || size(self.metrics) > 0 || (has(self.checks) && size(self.checks) > 0)",
             NOTHING_SCORED),
        )
    )
    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=40,
                      description="Task name (a DNS label), unique among the tasks; status and the report show it.")
    uri: S3Uri = Field(description="S3 URI of a JSON-lines file (or a prefix of them) of held-out rows.")
    format: TaskFormat = Field(
        default=TaskFormat.instruction,
        description="instruction: {instruction, input, output}, the reference is output; chat: {messages}, the "
        "prompt is every turn before the last assistant turn, the reference is that turn. The prompt is built "
        "exactly as for training (chat template and all).")
    maxSamples: int = Field(default=64, ge=1, le=10_000, description="Rows evaluated (a seeded sample).")
    maxNewTokens: int = Field(default=64, ge=1, le=1024, description="Most tokens generated per answer.")
    metrics: list[TaskMetric] = Field(
        default_factory=lambda: [m.value for m in TaskMetric], max_length=4,
        description="Scores against the reference, each in [0, 1]: exactMatch and tokenF1 (after lower-casing and "
        "removing punctuation and articles), rougeL (F-measure, rouge-score), bleu (corpus BLEU / 100, sacrebleu). "
        "Empty only with checks: a task scores at least one metric or one check.")
    checks: list[AnswerCheck] = Field(default_factory=list, max_length=MAX_ANSWER_CHECKS,
                                      description="Domain checks on each answer (contains a text, matches a pattern).")
    gate: TaskGate | None = Field(default=None, description="Fail the run when the task's score is too low.")

    def problems(self) -> list[str]:
        """The CEL rules above, in Python (for documents that never went through an API server)."""
        out, names = [], [c.name for c in self.checks]
        if not self.metrics and not self.checks:
            out.append(f"metrics: {NOTHING_SCORED}")
        for i, check in enumerate(self.checks):
            if (check.contains is None) == (check.pattern is None):
                out.append(f"checks[{i}]: set exactly one of contains and pattern")
            if names.index(check.name) != i:
                out.append(f"checks[{i}].name: {check.name!r} is already used by an earlier check")
            if check.name in [m.value for m in TaskMetric]:  # (bleu: the other metrics' names are not DNS labels)
                out.append(f"checks[{i}].name: {check.name!r} is the name of a metric")
        if self.gate is not None:
            if self.gate.minScore is None and self.gate.minGain is None:
                out.append("gate: set minScore, minGain or both")
            if self.gate.metric not in [*self.metrics, *names]:
                out.append(f"gate.metric: {self.gate.metric!r} is not one of the task's metrics or checks")
        return out


class GeneralEvaluation(ApiModel):
    """The forgetting check: perplexity on general-domain text before and after training."""

    uri: S3Uri = Field(description="S3 URI of a JSON-lines file (or a prefix) of {\"text\": ...} rows outside the "
                       "training domain.")
    maxSamples: int = Field(default=128, ge=1, le=100_000, description="Rows measured.")
    maxPerplexityRise: float | None = Field(
        default=None, gt=0, le=100,
        description="Gate: fail the run when general perplexity rises by more than this fraction (0.1: 10%) "
        "from the base model to the tuned one.")


EVALUATE_ONLY_RULE = ("evaluation.only: an evaluate-only job needs one candidate, method.adapter (an adapter method) "
                      "or evaluation.candidateModel (method full), and evaluation.tasks or evaluation.general, and no "
                      "datasets, stages, search, output.combine, output.merge or evaluation.maxPerplexityRatio")


CANDIDATE_MODEL_RULE = "evaluation.candidateModel needs evaluation.only (it is evaluated, not trained)"


def evaluate_only_conflicts(job) -> bool:
    """evaluation.only set on a job (a TrainerConfig or a FineTuneJobSpec) that cannot be evaluate-only: not exactly
    one candidate (method.adapter, or evaluation.candidateModel with method full), nothing to evaluate it on, or
    something to train, search, combine or merge."""
    evaluation = job.evaluation
    if not evaluation.only:
        return False
    candidate_model = evaluation.candidateModel is not None
    return ((job.method.adapter is not None) == candidate_model or (candidate_model and job.method.type != "full")
            or not (evaluation.tasks or evaluation.general) or bool(job.datasets)
            or bool(job.stages) or getattr(job, "search", None) is not None or job.output.combine is not None
            or job.output.merge or evaluation.maxPerplexityRatio is not None)


class CandidateModel(ApiModel):
    uri: S3Uri = Field(
        description="S3 prefix of a whole model in Hugging Face format (config.json and safetensors weights, as a "
        "full fine-tune or output.merge writes to <output.uri>merged/) of the same architecture "
        "and vocabulary as model.uri; it answers with model.uri's tokenizer, so that both see the same prompts.")


class Evaluation(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=cel(
            ("!has(self.tasks) || self.tasks.all(t, self.tasks.exists_one(u, u.name == t.name))",
             "evaluation.tasks: task names must be unique"),
            ("!has(self.tasks) || !has(self.compareToBase) || self.compareToBase || "
             "self.tasks.all(t, !has(t.gate) || !has(t.gate.minGain))",
             "evaluation.tasks[].gate.minGain needs evaluation.compareToBase true"),
            ("!has(self.candidateModel) || (has(self.only) && self.only)", CANDIDATE_MODEL_RULE),
        )
    )
    compareToBase: bool = Field(
        default=True,
        description="Measure the base model (model.uri) as the baseline: its validation perplexity before training "
        "(maxPerplexityRatio needs it) and its answers to evaluation.tasks (the base scores and deltas; "
        "tasks[].gate.minGain needs them). The base model's general perplexity (evaluation.general) is measured "
        "either way.")
    maxPerplexityRatio: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="Gate: fail the run when tuned perplexity / base perplexity is above this (needs compareToBase).",
    )
    maxSamples: int = Field(default=256, ge=1, le=1_000_000, description="Validation rows used for perplexity.")
    everySteps: int = Field(
        default=0, ge=0, le=10_000_000,
        description="Also measure the validation loss every N optimizer steps (0: only at the end); progress.json "
        "keeps the history, which a search prunes on.")
    tasks: list[EvaluationTask] = Field(
        default_factory=list, max_length=MAX_EVALUATION_TASKS,
        description="Task evaluation after training: held-out prompts answered by the base (with compareToBase) and "
        "the tuned model, scored against reference answers.")
    general: GeneralEvaluation | None = Field(
        default=None, description="Forgetting check: general-domain perplexity before and after training.")
    only: bool = Field(
        default=False,
        description="Evaluate without training: a candidate, the adapter in method.adapter or the whole model in "
        "candidateModel (with method full), against the base model (model.uri) on evaluation.tasks and "
        "evaluation.general, with the gates and the report; no datasets, stages, search, output.combine, "
        "output.merge or maxPerplexityRatio (no validation split).")
    candidateModel: CandidateModel | None = Field(
        default=None, description="The whole model an evaluate-only job compares with model.uri (only with "
        "evaluation.only and method full; for an adapter use method.adapter).")
    reportSamples: int = Field(default=8, ge=0, le=50,
                               description="Rows per task shown side by side (prompt, reference, base and tuned "
                               "answer) in the evaluation report.")

    def task_problems(self) -> list[str]:
        """The rules of tasks (each task's, unique names, minGain needing compareToBase), as `tasks[i]...: message`."""
        out, names = [], [t.name for t in self.tasks]
        for i, task in enumerate(self.tasks):
            out += [f"tasks[{i}].{p}" for p in task.problems()]
            if names.index(task.name) != i:
                out.append(f"tasks[{i}].name: {task.name!r} is already used by an earlier task")
            if task.gate is not None and task.gate.minGain is not None and not self.compareToBase:
                out.append(f"tasks[{i}].gate.minGain needs evaluation.compareToBase true")
        return out


REGION_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"


class Storage(ApiModel):
    endpoint: str = Field(default="", max_length=2048,
                          description="S3-compatible endpoint: an origin (scheme://host[:port]) the operator allows "
                          "(OperatorConfig s3Endpoint and allowedS3Endpoints); empty means the operator's default.")
    region: str = Field(default="us-east-1", pattern=REGION_PATTERN, max_length=63,
                        description="S3 region: letters, digits and inner dashes (a host label), as botocore accepts.")


# ---- the TrainerConfig document -------------------------------------------------------------


class JobIdentity(ApiModel):
    namespace: str = Field(description="Namespace of the FineTuneJob.")
    name: str = Field(description="Name of the FineTuneJob.")
    uid: str = Field(default="", description="UID of the FineTuneJob.")
    runId: str = Field(default="1", description="Run identifier; a new runId is a fresh run with fresh checkpoints.")


class Runtime(ApiModel):
    metricsPort: int = Field(
        default=9090, ge=0, le=65535, description="Port of rank 0's Prometheus metrics endpoint; 0 disables it."
    )
    progressIntervalSeconds: float = Field(default=5.0, gt=0, description="How often rank 0 writes progress.json.")
    enforceGates: bool = Field(
        default=True, description="A failed evaluation gate fails the run. False for the trials of a search: their "
        "gates are evaluated and recorded in evaluation.json, and the search judges the promoted trial by them.")


class TrainerConfig(ApiModel):
    apiVersion: Literal["finetune.dev/trainer-config/v1"] = TRAINER_CONFIG_API_VERSION
    kind: Literal["TrainerConfig"] = "TrainerConfig"
    job: JobIdentity
    model: ModelSource
    datasets: list[Dataset] = Field(default_factory=list)
    validation: Validation = Field(default_factory=Validation)
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    method: Method = Field(default_factory=Method)
    objective: Objective = Objective.sft
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    stages: list[Stage] = Field(default_factory=list)
    distributed: Distributed = Field(default_factory=Distributed)
    checkpoint: Checkpoint = Field(default_factory=Checkpoint)
    output: Output
    evaluation: Evaluation = Field(default_factory=Evaluation)
    storage: Storage = Field(default_factory=Storage)
    runtime: Runtime = Field(default_factory=Runtime)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainerConfig":
        return cls.model_validate_json(text)


# ---- the S3 layout both sides rely on ----------------------------------------------------------


def _prefix(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


def run_prefix(output_uri: str, run_id: str) -> str:
    """Where a run's progress.json, data report, evaluation and result documents live."""
    return f"{_prefix(output_uri)}runs/{run_id}/"


def progress_uri(output_uri: str, run_id: str) -> str:
    return run_prefix(output_uri, run_id) + "progress.json"


def evaluation_uri(output_uri: str, run_id: str) -> str:
    return run_prefix(output_uri, run_id) + "evaluation.json"


def result_uri(output_uri: str, run_id: str) -> str:
    return run_prefix(output_uri, run_id) + "result.json"


def report_uri(output_uri: str, run_id: str) -> str:
    """The evaluation report (report.md, report.html and its plots) of a run."""
    return run_prefix(output_uri, run_id) + "report/"


def data_report_uri(output_uri: str, run_id: str) -> str:
    return run_prefix(output_uri, run_id) + "data-report.json"


def checkpoint_prefix(checkpoint_uri: str | None, output_uri: str, run_id: str) -> str:
    """Checkpoints of one run: <prefix>/step-00000200/... with a manifest.json written last."""
    base = _prefix(checkpoint_uri) if checkpoint_uri else _prefix(output_uri) + "checkpoints/"
    return f"{base}{run_id}/"


def adapter_uri(output_uri: str) -> str:
    return _prefix(output_uri) + "adapter/"


def merged_uri(output_uri: str) -> str:
    return _prefix(output_uri) + "merged/"


def combined_uri(output_uri: str) -> str:
    return _prefix(output_uri) + "combined/"


def stage_output_uri(output_uri: str, stage_name: str) -> str:
    return f"{_prefix(output_uri)}stages/{stage_name}/"


# ---- documents the trainer writes and the operator reads ----------------------------------------


def _cut(limit: int):
    """A string field of a document, cut to `limit` characters (a document is read, never refused, for
    an overlong message)."""
    def cut(value: Any) -> Any:
        return value[:limit] if isinstance(value, str) else value
    return BeforeValidator(cut)


# Bounds of what a document may carry (the operator copies it into the FineTuneJob's status; the
# documents live in the tenant's own bucket, so their content is the tenant's to choose).
Count = Annotated[int, Field(ge=0, le=2**53)]
ShortText = Annotated[str, _cut(256)]
LongText = Annotated[str, _cut(2048)]
MAX_CHECKPOINT_RECORDS = 1000


class Document(BaseModel):
    """Written by the trainer; read leniently by the operator (unknown fields ignored), within bounds:
    counts are non-negative and at most 2^53, numbers finite, strings cut to a length, lists bounded."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class CheckpointRecord(Document):
    step: Count
    uri: LongText
    time: ShortText


MAX_DATA_STAGES = 16     # as many as a FineTuneJob has stages
MAX_DATA_DATASETS = 32   # as many as a stage (or a job) has datasets
DataUri = Annotated[str, _cut(1024)]


def _count(value: Any) -> int:
    """A count of the data report as a Count: missing, non-numeric or non-finite is 0, clamped to [0, 2^53]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return min(max(int(value), 0), 2**53)


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


class PiiCounts(Document):
    """Replacements made by PII redaction (preprocessing.redactPII), by kind."""

    email: Count = Field(default=0, description="E-mail addresses replaced by [EMAIL].")
    phone: Count = Field(default=0, description="Phone numbers replaced by [PHONE].")
    ip: Count = Field(default=0, description="IPv4 and IPv6 addresses replaced by [IP].")
    card: Count = Field(default=0, description="Payment card numbers (Luhn-valid) replaced by [CARD].")
    key: Count = Field(default=0, description="Secret keys, tokens and private key blocks replaced by [KEY].")


class DatasetSummary(Document):
    """What preprocessing did to one dataset of a stage (a source of the data report)."""

    uri: DataUri = Field(default="", description="The dataset's S3 URI (cut to 1024 characters).")
    rowsRead: Count = Field(default=0, description="Non-empty rows read from the dataset's files.")
    rowsKept: Count = Field(default=0, description="Rows kept for training or validation after every filter.")
    droppedTooShort: Count = Field(
        default=0, description="Rows dropped by the length filter: fewer tokens than preprocessing.minTokens, or "
        "no trainable (target) tokens left after truncation.")
    truncated: Count = Field(default=0, description="Kept rows cut to preprocessing.maxSeqLength tokens.")
    duplicatesExact: Count = Field(default=0, description="Rows dropped as exact duplicates of an earlier row.")
    duplicatesNormalised: Count = Field(
        default=0, description="Rows dropped as duplicates after normalisation (case, whitespace, punctuation).")
    piiReplaced: PiiCounts = Field(default_factory=PiiCounts, description="PII replacements in the dataset's rows, by kind.")
    validationRows: Count = Field(default=0, description="Kept rows held out for validation (split off by splitRatio).")
    validationOverlapDropped: Count = Field(
        default=0, description="Held-out rows dropped because they share most of their word 8-grams with training rows.")
    trainTokens: Count = Field(default=0, description="Tokens of the dataset's training rows (before mixing and packing).")
    targetTokens: Count = Field(default=0, description="Training tokens the model learns to predict (the loss is taken on).")
    droppedByContentFilters: Count = Field(default=0, description="Rows dropped by a content filter (action drop).")
    flaggedByContentFilters: Count = Field(
        default=0, description="Matches of content filters with action flag: the rows are kept and counted.")

    @classmethod
    def from_source(cls, source: dict) -> "DatasetSummary":
        """From one entry of the data report's `sources` (pipeline.SourceReport.to_dict); missing keys are 0."""
        dropped, pii_counts = _mapping(source.get("dropped")), _mapping(source.get("piiRedacted"))
        uri = source.get("uri")
        return cls(
            uri=uri if isinstance(uri, str) else "",
            rowsRead=_count(source.get("rowsRead")),
            rowsKept=_count(source.get("rowsKept")),
            droppedTooShort=min(_count(dropped.get("too-short")) + _count(dropped.get("no-trainable-tokens")), 2**53),
            truncated=_count(source.get("truncated")),
            duplicatesExact=_count(dropped.get("duplicate-exact")),
            duplicatesNormalised=_count(dropped.get("duplicate-normalised")),
            piiReplaced=PiiCounts(**{kind: _count(pii_counts.get(kind)) for kind in PiiCounts.model_fields}),
            validationRows=_count(source.get("validationRows")),
            validationOverlapDropped=_count(dropped.get("validation-overlap")),
            trainTokens=_count(source.get("trainTokens")),
            targetTokens=_count(source.get("targetTokens")),
            droppedByContentFilters=_count(dropped.get("content-filter")),
            flaggedByContentFilters=min(sum(_count(_mapping(entry).get("rowsFlagged"))
                                            for entry in _mapping(source.get("contentFilters")).values()), 2**53),
        )


class ContentFilterSummary(Document):
    """What one content filter (preprocessing.contentFilters) did over a stage's datasets."""

    name: ShortText = Field(default="", description="The filter's name.")
    rowsDropped: Count = Field(default=0, description="Rows it dropped (action drop).")
    rowsFlagged: Count = Field(default=0, description="Rows it flagged and kept (action flag).")


class OverlapSummary(Document):
    """Validation rows checked for leakage from training (word 8-grams shared with the training rows)."""

    rowsChecked: Count = Field(default=0, description="Validation rows compared with the training rows.")
    rowsOverlapping: Count = Field(default=0, description="Validation rows sharing at least one word 8-gram with training.")
    rowsDropped: Count = Field(default=0, description="Validation rows dropped for sharing at least half of their 8-grams.")


class StageDataSummary(Document):
    """The data of one stage (a job without stages has one, named main): totals and datasets."""

    stage: ShortText = Field(default="", description="Name of the stage.")
    rowsRead: Count = Field(default=0, description="Rows read from the stage's datasets.")
    rowsDropped: Count = Field(
        default=0, description="Rows dropped: too short, no trainable tokens, duplicates, validation overlap, "
        "content filters.")
    trainSequences: Count = Field(default=0, description="Training sequences after mixing (and packing).")
    validationSequences: Count = Field(default=0, description="Validation sequences (after the overlap check).")
    trainTokens: Count = Field(default=0, description="Tokens of the training sequences: the tokens trained on per epoch.")
    targetTokens: Count = Field(default=0, description="Training tokens the loss is taken on (before mixing).")
    validationOverlap: OverlapSummary = Field(default_factory=OverlapSummary,
                                              description="Validation rows that leak from training.")
    packed: bool = Field(default=False, description="Training rows were packed into sequences of maxSeqLength.")
    datasets: list[DatasetSummary] = Field(default_factory=list, max_length=MAX_DATA_DATASETS,
                                           description="Per dataset, in the order of the spec.")
    contentFilters: list[ContentFilterSummary] = Field(
        default_factory=list, max_length=MAX_CONTENT_FILTERS,
        description="Per content filter, in the order of the spec: rows dropped and flagged over the datasets.")

    @classmethod
    def from_report(cls, stage_name: str, report: dict) -> "StageDataSummary":
        """From one stage's data report (pipeline.prepare's PreparedData.report); tolerant of missing keys."""
        report = _mapping(report)
        overlap = _mapping(_mapping(report.get("validation")).get("overlap"))
        sources = report.get("sources") if isinstance(report.get("sources"), list) else []
        return cls(
            stage=str(stage_name),
            rowsRead=_count(report.get("rowsRead")),
            rowsDropped=_count(report.get("rowsDropped")),
            trainSequences=_count(report.get("trainSequences")),
            validationSequences=_count(report.get("validationSequences")),
            trainTokens=_count(report.get("trainTokens")),
            targetTokens=_count(report.get("targetTokens")),
            validationOverlap=OverlapSummary(**{k: _count(overlap.get(k)) for k in OverlapSummary.model_fields}),
            packed=report.get("packed") is True,
            datasets=[DatasetSummary.from_source(_mapping(s)) for s in sources[:MAX_DATA_DATASETS]],
            contentFilters=[ContentFilterSummary(name=str(name)[:63], rowsDropped=_count(_mapping(counts).get("rowsDropped")),
                                                 rowsFlagged=_count(_mapping(counts).get("rowsFlagged")))
                            for name, counts in list(_mapping(report.get("contentFilters")).items())[:MAX_CONTENT_FILTERS]],
        )


class DataSummary(Document):
    """A summary of the data report (data-report.json), one entry per stage; rank 0 puts it in progress.json
    once the data of every stage is prepared."""

    stages: list[StageDataSummary] = Field(default_factory=list, max_length=MAX_DATA_STAGES,
                                           description="Per stage, in training order.")

    @classmethod
    def from_reports(cls, reports: dict[str, dict]) -> "DataSummary":
        """From {stageName: report} (the `stages` of data-report.json), in order; at most 16 stages."""
        items = list(_mapping(reports).items())[:MAX_DATA_STAGES]
        return cls(stages=[StageDataSummary.from_report(name, report) for name, report in items])

    @classmethod
    def from_report(cls, stage_name: str, report: dict) -> "DataSummary":
        """From one stage's report (a job without stages)."""
        return cls.from_reports({stage_name: report})


MAX_EVAL_HISTORY = 1000


class EvalPoint(Document):
    step: Count
    evalLoss: float


MAX_DATASET_LOSSES = MAX_DATA_STAGES * MAX_DATA_DATASETS


class DatasetLoss(Document):
    """The training loss of one dataset of a stage (multiTask.strategy interleave)."""

    stage: ShortText = Field(default="", description="Name of the stage.")
    index: Count = Field(default=0, description="Position of the dataset in the stage's datasets.")
    uri: DataUri = Field(default="", description="The dataset's S3 URI (cut to 1024 characters).")
    loss: float | None = Field(default=None, description="Its loss in the latest optimizer step that trained on it: "
                               "the mean over its target tokens (or pairs, rows) in that step, all processes.")
    step: Count = Field(default=0, description="The (global) optimizer step of that loss.")
    steps: Count = Field(default=0, description="Optimizer steps so far that trained on it.")


class Progress(Document):
    """progress.json, written by rank 0 every few seconds."""

    stage: ShortText = ""
    step: Count = 0
    totalSteps: Count = 0
    epoch: float = 0.0
    loss: float | None = None
    evalLoss: float | None = None
    learningRate: float | None = None
    tokensPerSecond: float | None = None
    etaSeconds: float | None = None
    updatedAt: ShortText = ""
    resumedFromStep: Count = 0
    checkpoints: list[CheckpointRecord] = Field(default_factory=list, max_length=MAX_CHECKPOINT_RECORDS)
    evalHistory: list[EvalPoint] = Field(default_factory=list, max_length=MAX_EVAL_HISTORY,
                                         description="Validation loss at every evaluation.everySteps step, oldest first.")
    data: DataSummary | None = Field(default=None, description="What preprocessing did to the data, per stage and dataset.")
    datasetLosses: list[DatasetLoss] = Field(
        default_factory=list, max_length=MAX_DATASET_LOSSES,
        description="Per dataset of every stage trained so far, its latest training loss (interleaved multi-task "
        "only: a mixed micro-batch has no per-dataset loss).")


class ScorePair(Document):
    """A score of the base and of the tuned model (base is None without compareToBase)."""

    base: float | None = None
    tuned: float | None = None
    delta: float | None = None


class TaskResult(Document):
    """One evaluation task: every metric and check, base against tuned."""

    name: ShortText = ""
    rows: Count = 0
    headline: ShortText = Field(default="", description="The metric status shows: the gate's, else the first.")
    metrics: dict[Annotated[str, _cut(64)], ScorePair] = Field(default_factory=dict, max_length=len(TaskMetric))
    checks: dict[Annotated[str, _cut(64)], ScorePair] = Field(default_factory=dict, max_length=MAX_ANSWER_CHECKS)


class GateResult(Document):
    """One gate: what it measured, its limit, and the message a failed gate ends the run with."""

    name: ShortText = ""
    metric: ShortText = ""
    value: float | None = None
    limit: float | None = None
    passed: bool = True
    message: LongText = ""


class GeneralResult(Document):
    """The forgetting check: general-domain perplexity of the base and of the tuned model."""

    basePerplexity: float | None = None
    perplexity: float | None = None
    rise: float | None = Field(default=None, description="perplexity / basePerplexity - 1.")


class EvaluationResult(Document):
    """evaluation.json: validation perplexity of the base and of the tuned model, the task scores, the
    forgetting check, every gate, and where the report is."""

    basePerplexity: float | None = None
    perplexity: float | None = None
    ratio: float | None = None
    maxPerplexityRatio: float | None = None
    passed: bool = True
    tasks: list[TaskResult] = Field(default_factory=list, max_length=MAX_EVALUATION_TASKS)
    general: GeneralResult | None = None
    gates: list[GateResult] = Field(default_factory=list, max_length=2 + MAX_EVALUATION_TASKS)
    reportUri: LongText | None = None


class RunResult(Document):
    """result.json, written last by rank 0 when the run ends (either way)."""

    succeeded: bool
    reason: ShortText = ""
    message: LongText = ""
    adapterUri: LongText | None = None
    mergedUri: LongText | None = None
    combinedUri: LongText | None = None
