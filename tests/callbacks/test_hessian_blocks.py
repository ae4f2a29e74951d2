"""Per-block spectra (issue 16, item 1): ``HessianSpectrumMonitor(blocks=...)`` against the diagonal
blocks of the dense float64 Hessian of the probe batch, several seeds; overlapping blocks; a failing
block; resume; argument checks."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from chaos_callbacks import HessianSpectrumMonitor
from chaos_callbacks.callbacks import _plumbing as plumb
from tests.helpers import exact_hessian
from tests.lightning_helpers import TinyNet, assert_identical_runs, fit_snapshot, loader, random_classification, trainer

#: overlapping blocks of TinyNet (net.0: Linear 8→16, net.2: Linear 16→3): every weight is in two
BLOCKS = {"hidden": r"^net\.0\.", "output": r"^net\.2\.", "weights": r"weight$"}


def block_index(module, pattern: str) -> torch.Tensor:
    """Indices of the parameters matching ``pattern`` in the flat vector of all trainable parameters."""
    import re

    index, offset = [], 0
    for name, p in module.named_parameters():
        if re.search(pattern, name):
            index += range(offset, offset + p.numel())
        offset += p.numel()
    return torch.tensor(index)


class ExactBlocks(pl.Callback):
    """Listed before the monitor: the dense Hessian of the step's batch and the eigenvalues of its blocks."""

    def __init__(self, every: int) -> None:
        self.every, self.exact = every, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            x, y = batch
            H = exact_hessian(pl_module.net, x, y)
            self.exact[trainer.global_step] = {name: H[block_index(pl_module, p)][:, block_index(pl_module, p)] for name, p in BLOCKS.items()}


class Keep(pl.Callback):
    def __init__(self, monitor) -> None:
        self.monitor, self.seen = monitor, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.monitor._last_step == trainer.global_step - 1 and self.monitor.last_estimate:
            self.seen[trainer.global_step - 1] = dict(self.monitor.last_estimate)


def double_loader(seed: int, n: int = 48):
    data = random_classification(n=n, seed=seed)
    dataset = torch.utils.data.TensorDataset(data.tensors[0].double(), data.tensors[1])
    return torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocks_match_the_diagonal_blocks_of_the_exact_hessian(seed):
    monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=2, tol=1e-6, max_hvps=300, lambda_min=True, lambda_min_tol=1e-4,
                                     lambda_min_every_n_steps=2, lambda_min_max_hvps=300, trace=True, trace_samples=400,
                                     blocks=BLOCKS, seed=seed)
    exact, keep = ExactBlocks(2), Keep(monitor)
    pl.seed_everything(seed, verbose=False)
    t = trainer(callbacks=[exact, monitor, keep], max_steps=3, max_epochs=None)
    t.fit(TinyNet().double(), double_loader(seed))
    assert set(keep.seen) == {0, 2}
    for step, est in keep.seen.items():
        for name, H in exact.exact[step].items():
            evals = torch.linalg.eigvalsh(H)
            scale = float(evals.abs().max())
            for i in (1, 2):  # certified: the exact eigenvalue lies within the logged bound
                value, bound = est[f"hessian/{name}/eig_{i}"], est[f"hessian/{name}/eig_{i}_error"]
                assert abs(value - float(evals[-i])) <= bound + 1e-12 * scale, (name, i)
                assert bound <= 1e-6 * scale
            assert est[f"hessian/{name}/lambda_max"] == est[f"hessian/{name}/eig_1"]
            low = est[f"hessian/{name}/lambda_min"] - est[f"hessian/{name}/lambda_min_error"]
            assert low - 1e-12 * scale <= float(evals[0]) <= est[f"hessian/{name}/lambda_min"] + 1e-12 * scale, name
            assert est[f"hessian/{name}/lambda_min_error"] <= 1e-4 * scale
            trace, stderr = est[f"hessian/{name}/trace"], est[f"hessian/{name}/trace_stderr"]
            assert abs(trace - float(evals.sum())) <= 5 * stderr + 1e-9 * scale, name
            assert est[f"hessian/{name}/hvps"] > 0
        block_hvps = sum(est[f"hessian/{name}/hvps"] for name in BLOCKS)
        assert est["hessian/hvps"] > block_hvps  # the full estimate's products plus every block's
        assert "hessian/skipped" not in est


def test_blocks_share_the_steps_forward():
    forwards = [0]

    class Counting(TinyNet):
        def forward(self, x):
            forwards[0] += 1
            return super().forward(x)

    monitor = HessianSpectrumMonitor(every_n_steps=1, blocks=BLOCKS)
    pl.seed_everything(0, verbose=False)
    trainer(callbacks=[monitor], max_steps=1, max_epochs=None).fit(Counting(), loader())
    assert forwards[0] == 2  # one for the estimate (every block on its graph), one for training
    assert all(f"hessian/{name}/lambda_max" in monitor.last_estimate for name in BLOCKS)


def test_a_failing_block_skips_only_its_own_tags(monkeypatch):
    monitor = HessianSpectrumMonitor(every_n_steps=1, blocks=BLOCKS)
    hidden_dim = 8 * 16 + 16
    eigen = HessianSpectrumMonitor._eigen

    def failing(self, op, *args, **kwargs):
        if op.dim == hidden_dim:
            raise plumb.EstimateSkipped("not certified (test)")
        return eigen(self, op, *args, **kwargs)

    monkeypatch.setattr(HessianSpectrumMonitor, "_eigen", failing)
    keep = Keep(monitor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.seed_everything(0, verbose=False)
        t = trainer(callbacks=[monitor, keep], max_steps=3, max_epochs=None)
        t.fit(TinyNet(), loader())
    ours = [w for w in caught if "HessianSpectrumMonitor" in str(w.message)]
    assert len(ours) == 1 and "'hidden'" in str(ours[0].message) and "not certified (test)" in str(ours[0].message)
    for step, est in keep.seen.items():
        assert not any(k.startswith("hessian/hidden/") for k in est)
        assert {"hessian/lambda_max", "hessian/output/lambda_max", "hessian/weights/lambda_max"} <= set(est)
        assert est["hessian/skipped"] == step + 1
    assert float(t.callback_metrics["hessian/skipped"]) == 3


def test_monitoring_with_blocks_is_harmless():
    kw = dict(max_epochs=1, accumulate_grad_batches=2)
    model_kwargs = dict(batch_norm=True, dropout=0.3, momentum=0.9)
    baseline = fit_snapshot(model_kwargs, [], **kw)
    monitor = HessianSpectrumMonitor(every_n_steps=1, probe=24, trace=True, blocks={"bn": "net.1", "out": "net.4"})
    watched = fit_snapshot(model_kwargs, [monitor], **kw)
    assert "hessian/bn/lambda_max" in monitor.last_estimate
    assert_identical_runs(baseline, watched)


def test_resume_with_blocks_continues_exactly(tmp_path):
    def run(ckpt_path=None, save=False):
        pl.seed_everything(0, verbose=False)
        monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=2, probe=16, blocks=BLOCKS)
        keep = Keep(monitor)
        cbs = [monitor, keep]
        if save:
            cbs.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
        t = trainer(callbacks=cbs, max_epochs=4, enable_checkpointing=save)
        t.fit(TinyNet(), loader(shuffle=False), ckpt_path=ckpt_path)
        return keep.seen, monitor

    full, _ = run(save=True)
    resumed, monitor = run(ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert min(resumed) == 8 and set(monitor._blocks_warm) == set(BLOCKS)
    for step in resumed:
        assert resumed[step] == full[step]  # the block warm starts were checkpointed: bit-identical estimates


def test_a_pattern_matching_nothing_is_refused_at_fit_start():
    monitor = HessianSpectrumMonitor(blocks={"hidden": r"net\.0", "conv": r"^conv"})
    with pytest.raises(ValueError, match=r"HessianSpectrumMonitor: blocks\['conv'\] = '\^conv' matches no trainable"):
        trainer(callbacks=[monitor], max_steps=1, max_epochs=None).fit(TinyNet(), loader())
    small = HessianSpectrumMonitor(top_k=4, blocks={"bias": r"net\.2\.bias"})  # 3 entries
    with pytest.raises(ValueError, match=r"HessianSpectrumMonitor: blocks\['bias'\] matches 3 parameter entries, fewer than top_k=4"):
        trainer(callbacks=[small], max_steps=1, max_epochs=None).fit(TinyNet(), loader())


@pytest.mark.parametrize(
    "blocks",
    [{}, [("a", "x")], "net", {"a/b": "x"}, {"": "x"}, {1: "x"}, {"a b": "x"}, {"a": "("}, {"a": 3}, {"a": None}],
)
def test_invalid_blocks(blocks):
    with pytest.raises(ValueError, match="HessianSpectrumMonitor: .*blocks"):
        HessianSpectrumMonitor(blocks=blocks)
