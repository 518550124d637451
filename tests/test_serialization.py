"""Saved posteriors: atomic writes that never destroy the previous file, checksums that catch
corruption, and the same posterior after a round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cases import CASES
from torch.utils.data import DataLoader, TensorDataset

from bayes_kfoc import Laplace
from bayes_kfoc.laplace import serialization


def _fitted(modules: str = "all") -> Laplace:
    model, x, y = CASES[0].make()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    return Laplace(model, modules=modules, prior_precision=0.5, progress=False).fit(loader)


def test_interrupted_save_keeps_the_previous_posterior(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    la = _fitted()
    path = tmp_path / "posterior.pt"
    la.save(path)
    before = path.read_bytes()

    def crash(obj: object, f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(serialization.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        la.save(path)
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["posterior.pt"]  # no temporary left


def test_a_flipped_byte_in_the_tensor_data_is_detected(tmp_path: Path) -> None:
    la = _fitted()
    path = tmp_path / "posterior.pt"
    la.save(path)
    raw = bytearray(path.read_bytes())
    want = la.prior_precision.cpu().numpy().tobytes()  # float64 τ: find its bytes in the file
    at = bytes(raw).find(want)
    assert at >= 0
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted"):
        Laplace.load(path, la.model)


def test_round_trip_keeps_curvature_prior_and_coverage(tmp_path: Path) -> None:
    la = _fitted("last_layer")
    path = tmp_path / "posterior.pt"
    la.save(path)
    la2 = Laplace.load(path, la.model)
    assert la2.modules == la.modules == "last_layer"
    assert la2.curvature is not None and la.curvature is not None
    assert la2.curvature.coverage == la.curvature.coverage
    torch.testing.assert_close(la2.prior_precision, la.prior_precision)
    x = CASES[0].make()[1][:3]
    torch.testing.assert_close(la2.predict(x), la.predict(x))


def test_subset_is_a_deprecated_spelling_of_modules() -> None:
    model, _, _ = CASES[0].make()
    with pytest.warns(DeprecationWarning, match="subset= is deprecated.*modules="):
        assert Laplace(model, subset="last_layer").modules == "last_layer"
    with pytest.warns(DeprecationWarning, match="subset= is deprecated"):  # positional too
        assert Laplace(model, "classification", "kfac", "exact", "last_layer").modules == (
            "last_layer"
        )
    with pytest.warns(DeprecationWarning, match="Laplace.modules"):
        assert Laplace(model, modules=["0"]).subset == ["0"]
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="modules= only"):
        Laplace(model, subset="all", modules="all")


def test_the_predictives_take_keywords_and_the_old_positional_order_is_deprecated() -> None:
    model, x, y = CASES[0].make()
    la = Laplace(model, structure="kfac", progress=False).fit(
        DataLoader(TensorDataset(x, y), batch_size=4)
    )
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    new = la.predictive_samples(x[:3], method="mc", n_samples=4, generator=gen())
    with pytest.warns(DeprecationWarning, match="pass n_samples=, method=, generator= by keyword"):
        old = la.predictive_samples(x[:3], 4, "mc", gen())
    torch.testing.assert_close(old, new)
    with pytest.warns(DeprecationWarning, match="pass method=, link= by keyword"):
        old_p = la.predict(x[:3], "glm", "probit")
    torch.testing.assert_close(old_p, la.predict(x[:3], method="glm", link="probit"))
    with pytest.raises(TypeError, match="at most 5 arguments after x"):
        la.predict(x[:3], "glm", "probit", 10, None, "auto", "extra")
