"""The layers and LongNetLM on one process or on this rank's shard, for the ring and FSDP2 tests.

Every builder seeds torch itself, so every rank and the single process get the same weights.
Results are numpy arrays (tensors would travel back through shared memory that dies with a worker).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ring_core import create_attention, shard_sequence
from ring_multihead import DilatedTransformerDecoderLayer, DilatedTransformerEncoderLayer, LongNetLM

F64 = torch.float64
DILATED = {"segment_lengths": [4, 8, 16], "dilation_rates": [1, 2, 4]}
N = 24


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def encoder(group: Any = None, layout: str = "contiguous") -> DilatedTransformerEncoderLayer:
    torch.manual_seed(0)
    return DilatedTransformerEncoderLayer(
        16, 4, 24, dropout=0.0, activation="gelu", batch_first=True, norm_first=True, dtype=F64, **DILATED,
        sub_layer_norm=True, gamma_init=1.3, process_group=group, layout=layout,
    )  # fmt: skip


def decoder(group: Any = None, layout: str = "contiguous") -> DilatedTransformerDecoderLayer:
    torch.manual_seed(1)
    return DilatedTransformerDecoderLayer(
        16, 4, 24, dropout=0.0, batch_first=True, dtype=F64, **DILATED, process_group=group, layout=layout
    )


def longnet(group: Any = None, layout: str = "contiguous", checkpointing: bool = False) -> LongNetLM:
    torch.manual_seed(2)
    return LongNetLM(
        31, 64, 16, 4, 2, **DILATED, dtype=F64, process_group=group, layout=layout,
        activation_checkpointing=checkpointing,
    )  # fmt: skip


class AttentionBlock(nn.Module):
    """``out(attention(qkv(x)))`` around a ring-core attention module, the attention part checkpointed or not."""

    def __init__(self, attention: nn.Module, checkpointing: bool = False) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.qkv = nn.Linear(16, 48, dtype=F64)
        self.out = nn.Linear(16, 16, dtype=F64)
        self.attention = attention
        self.checkpointing = checkpointing

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 4, 4)).unbind(2)
        return self.out(self.attention(q, k, v, is_causal=True).flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing:
            return checkpoint(self._attend, x, use_reentrant=False)
        return self._attend(x)


def attention_block(name: str = "dilated", checkpointing: bool = False, **options: Any) -> AttentionBlock:
    return AttentionBlock(create_attention(name, **DILATED, **options), checkpointing)


def sum_gradients(model: nn.Module) -> None:
    """FSDP2 reduces gradients by a sum (each rank's loss is a share of the batch loss); gloo has no AVG."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def tokens() -> torch.Tensor:
    return torch.randint(0, 31, (2, N), generator=torch.Generator().manual_seed(3))


def padding() -> torch.Tensor:
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[1, 5:9] = True
    return mask


def run_case(name: str, rank: int = 0, world_size: int = 1, layout: str = "contiguous") -> dict[str, Any]:
    """Forward and backward of case ``name`` on this rank's shard (the whole sequence when ``world_size`` is 1)."""
    import torch.distributed as dist

    group = dist.group.WORLD if world_size > 1 else None

    def shard(x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, layout, dim=1, rank=rank, world_size=world_size).contiguous()

    if name == "encoder":
        module = encoder(group, layout)
        leaves = {"src": shard(randn(2, N, 16, seed=4)).requires_grad_()}
        out = module(**leaves, src_key_padding_mask=shard(padding()), is_causal=True)
    elif name == "decoder":
        module = decoder(group, layout)
        leaves = {"tgt": shard(randn(2, N, 16, seed=5)).requires_grad_(), "memory": randn(2, 7, 16, seed=6)}
        leaves["memory"].requires_grad_()
        out = module(**leaves, tgt_key_padding_mask=shard(padding()), tgt_is_causal=True)
    elif name == "block":
        module = attention_block()
        leaves = {"x": randn(2, N, 16, seed=8).requires_grad_()}
        out = module(**leaves)
    else:
        module = longnet(group, layout)
        leaves = {}
        out = module(shard(tokens()))
    (out * shard(randn(*out.shape[:1], N, *out.shape[2:], seed=7))).sum().backward()
    result = {"out": out.detach().numpy()}
    result.update({f"d{key}": x.grad.numpy() for key, x in leaves.items()})
    result.update({f"d{key}": p.grad.numpy() for key, p in module.named_parameters()})
    return result


def ring_cases(rank: int, world_size: int, cases: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [run_case(name, rank, world_size, layout) for name, layout in cases]


def fsdp_checkpoint_cases(rank: int, world_size: int, layout: str) -> dict[str, dict[str, Any]]:
    """LongNetLM and an attention block on the ring, sharded by FSDP2 and checkpointed; full (summed) gradients."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    def shard(x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, layout, dim=1, rank=rank, world_size=world_size).contiguous()

    model = longnet(dist.group.WORLD, layout, checkpointing=True)
    for layer in model.layers:
        fully_shard(layer)
    block = attention_block("ring_dilated", checkpointing=True, layout=layout)
    results = {}
    for name, module, inputs in (
        ("longnet", model, {"tokens": shard(tokens())}),
        ("block", block, {"x": shard(randn(2, N, 16, seed=8)).requires_grad_()}),
    ):
        fully_shard(module)
        sum_gradients(module)
        out = module(**inputs)
        (out * shard(randn(*out.shape[:1], N, *out.shape[2:], seed=7))).sum().backward()
        result = {"out": out.detach().numpy()}
        result.update({f"d{key}": x.grad.numpy() for key, x in inputs.items() if x.is_floating_point()})
        result.update({f"d{key}": p.grad.full_tensor().numpy() for key, p in module.named_parameters()})
        results[name] = result
    return results
