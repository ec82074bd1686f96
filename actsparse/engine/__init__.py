"""Fast decode on the user's own model: a static-cache decoder captured in one CUDA graph per step."""

from .attention import ATTENTION, attention_of, decode_attention_scope, restore_attention, use_decode_attention
from .decoder import Decoder, DecodeResult, eos_token_ids, forward_kwargs
from .fusion import fuse_projections, fused_groups, unfuse_projections
from .glu import fuse_glu, glu_fused, unfuse_glu
from .norms import fuse_norms, norms_fused, unfuse_norms
from .rope import fuse_rope, rope_fused, unfuse_rope
from .sampling import check_sampling, select_next

__all__ = [
    "Decoder",
    "ATTENTION",
    "attention_of",
    "use_decode_attention",
    "restore_attention",
    "decode_attention_scope",
    "DecodeResult",
    "select_next",
    "check_sampling",
    "forward_kwargs",
    "eos_token_ids",
    "fuse_projections",
    "unfuse_projections",
    "fused_groups",
    "fuse_glu",
    "unfuse_glu",
    "glu_fused",
    "fuse_norms",
    "unfuse_norms",
    "norms_fused",
    "fuse_rope",
    "unfuse_rope",
    "rope_fused",
]
