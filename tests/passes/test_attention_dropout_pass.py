"""Training-mode attention dropout: the site fuses with dropout_p and an in-graph rng draw; the op's mask is the
reference's for that rng (eager's own mask cannot be reproduced), and eval mode inserts nothing random."""

from __future__ import annotations

import operator
from collections.abc import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from _attention_cases import SQUARE, Attend, DropoutModule, _scores, qkv
from _helpers import ops_in, run_pass, sites, tilefuse_nodes
from torch import Tensor, nn

from tilefuse.codegen import reference as ref
from tilefuse.codegen.op_schema import RNG_HIGH
from tilefuse.passes.attention import AttentionPass
from tilefuse.passes.canonicalize import CanonicalizePass
from tilefuse.passes.manager import PassManager

PIPELINE = PassManager([CanonicalizePass(), AttentionPass()])
P = 0.1


def functional_dropout(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.dropout(_scores(q, k).softmax(-1), p=P, training=True) @ v


def sdpa_dropout(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=P)


SPELLINGS: dict[str, Callable[[], nn.Module]] = {
    "functional": lambda: Attend(functional_dropout),
    "module_train": lambda: DropoutModule().train(),
    "sdpa": lambda: Attend(sdpa_dropout),
}


def _randint_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is torch.ops.aten.randint.low]


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_training_dropout_fuses_with_p_and_an_rng_draw(name: str) -> None:
    inputs = qkv(SQUARE[2], torch.Generator().manual_seed(0))
    gm, ctx = run_pass(PIPELINE, SPELLINGS[name](), inputs)
    (site,) = sites(ctx, "attention", "fused")
    assert site.spec.dropout_p == P and not ctx.counters["attention_declined"]
    assert not ops_in(gm) & {"aten.dropout", "aten.scaled_dot_product_attention", "aten.softmax"}, gm.code
    (node,) = tilefuse_nodes(gm, "attention")
    (rng,) = _randint_nodes(gm)
    assert node.args[-2:] == (P, rng)
    assert rng.meta["val"].dtype == torch.int64 and tuple(rng.meta["val"].shape) == (2,)
    assert [u.target for u in node.users] == [operator.getitem] and next(iter(node.users)).args[1] == 0
    out, lse = node.meta["val"]
    assert lse.dtype == torch.float32 and tuple(lse.shape) == tuple(out.shape[:-1])


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_fused_dropout_is_the_reference_for_the_drawn_rng(name: str) -> None:
    """The graph draws [seed, offset] from torch's generator, so a manual_seed fixes the mask."""
    q, k, v = qkv(SQUARE[2], torch.Generator().manual_seed(1))
    gm, _ = run_pass(PIPELINE, SPELLINGS[name](), (q, k, v))
    torch.manual_seed(7)
    ours = gm(q, k, v)
    torch.manual_seed(7)
    rng = torch.randint(0, RNG_HIGH, (2,), dtype=torch.int64)
    flags = ref.AttnFlags(q.shape[-1] ** -0.5, dropout_p=P)
    want = ref.attention_forward(ref.AttnInputs(q, k, v, rng=rng), flags)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    torch.manual_seed(7)
    assert torch.equal(gm(q, k, v), ours)
    assert not torch.equal(gm(q, k, v), ours)  # a fresh draw


def test_eval_mode_dropout_draws_nothing() -> None:
    inputs = qkv(SQUARE[2], torch.Generator().manual_seed(2))
    module = DropoutModule().eval()
    gm, ctx = run_pass(PIPELINE, module, inputs)
    (site,) = sites(ctx, "attention", "fused")
    assert site.spec.dropout_p == 0.0 and not _randint_nodes(gm)
    (node,) = tilefuse_nodes(gm, "attention")
    assert node.args[-2:] == (0.0, None)
    torch.testing.assert_close(gm(*inputs), module(*inputs), atol=1e-5, rtol=1e-5)
