"""Model FLOPs per token and the peak throughput of a GPU: what tflops_per_gpu and MFU are made of.

Training FLOPs per token of a Llama-style decoder (forward + backward = 3 x forward; a
multiply-add counts 2), with L layers, hidden size h, a heads of d_k channels (q = a*d_k), g KV
groups, FFN size f, sequence length s and padded vocabulary V:

    per layer   attention projections  6 * (4*h*q + 4*h*g*d_k)         Q and O, K and V (GQA)
                attention core         6 * (2*s*q)                      Q.K^T and P.V, full s
                MLP                    6 * (k*h*f), k = 3 gated (SwiGLU), 2 otherwise
    once        LM head                6 * h*V

That is Megatron-LM's num_floating_point_operations (and PaLM's 6N + 12*L*q*s): the attention
core counts the full s x s score matrix, although causal masking and packed documents need less
of it, so MFU stays comparable with published numbers (docs/monitoring.md). Embedding lookups,
norms, rotary and the softmax are not counted.
"""

from __future__ import annotations

from typing import Optional

# Dense (no sparsity) peak TFLOP/s per GPU for bf16 from NVIDIA's data sheets; the first
# substring of the device name that matches wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("A10G", 70.0),
)


def flops_per_token(*, num_layers: int, hidden_size: int, ffn_hidden_size: int, num_attention_heads: int,
                    seq_len: int, vocab_size: int, num_query_groups: Optional[int] = None,
                    kv_channels: Optional[int] = None, gated_linear_unit: bool = True) -> float:
    """Training (forward + backward) FLOPs per token; see the module docstring."""
    h, L, s = hidden_size, num_layers, seq_len
    d_k = kv_channels or hidden_size // num_attention_heads
    q = num_attention_heads * d_k
    kv = (num_query_groups or num_attention_heads) * d_k
    projections = 2 * (2 * h * q) + 2 * (2 * h * kv)  # Q and O; K and V
    core = 2 * 2 * s * q
    mlp = (3 if gated_linear_unit else 2) * 2 * h * ffn_hidden_size
    lm_head = 2 * h * vocab_size
    return 3.0 * (L * (projections + core + mlp) + lm_head)


def model_flops_per_token(transformer, seq_len: int, vocab_size: int) -> float:
    """flops_per_token for a megatron-core TransformerConfig; ``vocab_size`` is the padded one (the
    LM head computes every row)."""
    t = transformer
    return flops_per_token(num_layers=t.num_layers, hidden_size=t.hidden_size, ffn_hidden_size=t.ffn_hidden_size,
                           num_attention_heads=t.num_attention_heads, num_query_groups=t.num_query_groups,
                           kv_channels=t.kv_channels, seq_len=seq_len, vocab_size=vocab_size,
                           gated_linear_unit=t.gated_linear_unit)


def peak_tflops(device_name: Optional[str], dtype: str, override: Optional[float] = None) -> Optional[float]:
    """The peak for MFU: the override if given; else the bf16 table for a known GPU; else None
    (CPU, fp32 - TF32 or FP32 peak is a choice we do not make for you - or an unknown GPU)."""
    if override is not None:
        return float(override)
    if device_name is None or dtype != "bf16":
        return None
    for name, peak in PEAK_BF16_TFLOPS:
        if name in device_name:
            return peak
    return None
