"""Choices and defaults of checkpoint conversion, without torch's or megatron-core's import
cost: ``cp-megatron convert`` builds its flags from these, and every other subcommand's start-up
(``cp-megatron run`` builds the whole parser) stays free of megatron-core's ~3 s import.
:mod:`cp_megatron.checkpoint.convert` is the one user of them beyond the flags."""

TO_FORMATS = ("sharded", "hf")
DTYPE_NAMES = ("bf16", "fp32")        # --dtype choices
WEIGHTS = ("dtype", "fp8-rowwise")
DEFAULT_MAX_SHARD = "5GB"             # --to hf: size of one safetensors file (as save_pretrained)
VERIFY_ATOL = 1e-5                    # float32 logits; both sides use the same rounded weights
