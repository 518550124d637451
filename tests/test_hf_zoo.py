"""Hugging Face models as users load them: tiny BERT, DistilBERT, GPT-2 and a peft LoRA built
from configs (random weights, nothing downloaded), called with dict batches with padding and
returning ``ModelOutput``. The fit in every structure covers every trainable parameter; tuning,
the GLM and MC predictives, save/load and the Pyro guide run unchanged; and the exact diagonal
of GPT-2 (Conv1D projections, a position embedding without a batch dimension) and of BERT
matches brute-force float64 per-point Jacobians."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

transformers = pytest.importorskip("transformers")

from bayes_kfoc import KronBlock, Laplace, fit_curvature  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # tuning on random weights: T at its edge
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
VOCAB, CLASSES = 50, 3


def bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=CLASSES,
    )
    return transformers.BertForSequenceClassification(cfg)


def distilbert() -> nn.Module:
    cfg = transformers.DistilBertConfig(
        vocab_size=VOCAB,
        dim=16,
        n_layers=1,
        n_heads=2,
        hidden_dim=32,
        max_position_embeddings=16,
        num_labels=CLASSES,
    )
    return transformers.DistilBertForSequenceClassification(cfg)


def gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=16,
        num_labels=CLASSES,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return transformers.GPT2ForSequenceClassification(cfg)


def lora_bert() -> nn.Module:
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(
        task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0
    )
    return peft.get_peft_model(bert(), cfg)


def roberta() -> nn.Module:
    cfg = transformers.RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=20,
        num_labels=CLASSES,
        pad_token_id=1,
    )
    return transformers.RobertaForSequenceClassification(cfg)


def vit() -> nn.Module:
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=CLASSES,
    )
    return transformers.ViTForImageClassification(cfg)


def swin() -> nn.Module:  # window attention: q/k/v on a batch folded into windows
    cfg = transformers.SwinConfig(
        image_size=16,
        patch_size=2,
        num_channels=3,
        embed_dim=8,
        depths=[2, 1],
        num_heads=[2, 2],
        window_size=4,
        num_labels=CLASSES,
    )
    return transformers.SwinForImageClassification(cfg)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "bert": bert,
    "distilbert": distilbert,
    "gpt2": gpt2,
    "lora": lora_bert,
    "roberta": roberta,
    "vit": vit,
    "swin": swin,
}
IMAGES = {"vit", "swin"}


def batch(n: int, t: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    """Token ids with right padding (id 0, mask 0) after a random length in ``[2, t]``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, t), generator=g)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t) < lengths[:, None]).long()
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, CLASSES, (n,), generator=g)


def data(name: str, n: int, t: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    if name not in IMAGES:
        x, y = batch(n, t, seed)
        if name == "roberta":  # RoBERTa's padding id is 1 (its positions count from it)
            x["input_ids"] = x["input_ids"] + (1 - x["attention_mask"])
        return x, y
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g)}, torch.randint(
        0, CLASSES, (n,), generator=g
    )


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BUILDERS[name]().eval()


def trainable(model: nn.Module) -> set[str]:
    return {k for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("structure", ["kfoc", "kfac", "diag"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_fit_covers_every_trainable_parameter(name: str, structure: str) -> None:
    model = build(name)
    batches = [data(name, 6, 7, 0), data(name, 5, 5, 1)]
    curv = fit_curvature(model, batches, structure, progress=False)
    covered = {k for k, how in curv.coverage.items() if "block" in how}
    assert covered == trainable(model), set(curv.coverage) - covered
    assert "" not in curv.blocks
    kron = {k for k, b in curv.blocks.items() if isinstance(b, KronBlock)}
    if structure == "diag":
        assert not kron
    elif name == "gpt2":  # the Conv1D projections are Kronecker
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert f"transformer.h.0.{m}" in kron
    elif name == "lora":  # the adapters are Kronecker
        assert sum("lora_" in k for k in kron) == 4
    elif name == "swin":  # the window attention's projections, on the folded batch
        assert any(k.endswith("attention.q_proj") for k in kron)
    elif name == "vit":
        assert any(k.endswith("attention.q_proj") for k in kron)
    else:
        assert any(k.endswith("query") or k.endswith("q_lin") for k in kron)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "lora"])
def test_tune_predict_save_load_and_pyro(name: str, tmp_path: Path) -> None:
    pyro = pytest.importorskip("pyro")
    from bayes_kfoc.pyro import LaplaceGuide, bayesian_model

    model = build(name)
    la = Laplace(model, structure="kfoc", progress=False)
    la.fit([batch(8, 7, 0), batch(8, 5, 1)])
    x, y = batch(8, 6, 2)
    result = la.optimize_prior_precision(val_loader=[(x, y)])
    assert torch.isfinite(result).all()
    glm = la.predict(x)
    mc = la.predict(x, method="mc", n_samples=4)
    for p in (glm, mc):
        assert p.shape == (8, CLASSES)
        torch.testing.assert_close(p.sum(-1), torch.ones(8))
    la.save(tmp_path / "la.pt")
    torch.testing.assert_close(Laplace.load(tmp_path / "la.pt", model).predict(x), glm)
    # peft's classes carry ABCMeta, which Pyro cannot mix PyroModule into: the prior sites then
    # live on a mirror of the parameter owners, under the same names.
    bm = bayesian_model(model, prior_precision=la.prior_precision, laplace=la, linearized=True)
    guide = LaplaceGuide(bm, la)
    pred = pyro.infer.Predictive(bm, guide=guide, num_samples=3, return_sites=["obs"])(x)
    assert pred["obs"].shape == (3, 8)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    trace = pyro.poutine.trace(bm).get_trace(x)
    assert trainable <= set(trace.nodes)


def _exact_diagonal(model: nn.Module, x: dict[str, Tensor]) -> dict[str, Tensor]:
    """``{param: diag}`` of the exact summed Fisher, by ``jacrev`` one point at a time."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    total: dict[str, Tensor] = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in range(x["input_ids"].shape[0]):
        xi = {k: v[i : i + 1] for k, v in x.items()}

        def f(p: dict[str, Tensor], xi: dict[str, Any] = xi) -> Tensor:
            return functional_call(model, p, (), xi).logits[0]

        jac = jacrev(f)(params)
        with torch.no_grad():
            prob = torch.softmax(f(params), -1)
        h = torch.diag(prob) - torch.outer(prob, prob)
        for k, j in jac.items():
            jj = j.reshape(j.shape[0], -1)
            total[k] += torch.einsum("ap,ab,bp->p", jj, h, jj).reshape(total[k].shape)
    return total


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_exact_diagonal_against_brute_force(name: str) -> None:
    model = build(name).double()
    model.config._attn_implementation = "eager"
    x, y = batch(5, 6, 3)
    curv = fit_curvature(model, [(x, y)], "diag", progress=False)
    exact = _exact_diagonal(model, x)
    for block in curv.blocks.values():
        for p, values in zip(
            block.param_shapes,
            torch.split(block.values, [s.numel() for s in block.param_shapes.values()]),
            strict=True,
        ):
            full = f"{block.name}.{p}" if block.name else p
            torch.testing.assert_close(values, exact[full].flatten(), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize(
    ("structure", "reduction"),
    [("kfoc", "auto"), ("kfac", "reduce"), ("kfac", "expand"), ("diag", "auto"), ("full", "auto")],
)
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_padding_adds_nothing(name: str, structure: str, reduction: str) -> None:
    """The same points fitted padded (one batch, ``attention_mask``) and unpadded (one batch
    per point, its own length): every block agrees, causal attention (GPT-2) included."""
    model = build(name).double()
    lengths = [6, 4, 3, 5]
    x, y = batch(4, 6, 7)
    mask = (torch.arange(6) < torch.tensor(lengths)[:, None]).long()
    ids = x["input_ids"].clamp_min(2) * mask
    padded = [({"input_ids": ids, "attention_mask": mask}, y)]
    single = [
        ({"input_ids": ids[i : i + 1, :n], "attention_mask": mask[i : i + 1, :n]}, y[i : i + 1])
        for i, n in enumerate(lengths)
    ]
    opts: dict[str, Any] = {"progress": False, "tol": 1e-12, "max_iter": 500}
    if structure == "kfac":
        opts["kfac_reduction"] = reduction
    a = fit_curvature(model, padded, structure, **opts)
    b = fit_curvature(model, single, structure, **opts)
    assert set(a.blocks) == set(b.blocks)
    dense = {k: (a.blocks[k].to_dense(), b.blocks[k].to_dense()) for k in a.blocks}
    # a key projection's reduced K-FAC block is round-off: Σ_t δ_t = 0 exactly for keys (the
    # softmax ignores a shift shared by every key), so errors are measured against the largest
    # block too
    floor = 1e-9 * max(float(torch.linalg.norm(db)) for _, db in dense.values())
    for k, (da, db) in dense.items():
        err = float(torch.linalg.norm(da - db)) / max(float(torch.linalg.norm(db)), floor)
        assert err < 1e-6, (k, err, float(torch.linalg.norm(db)))
