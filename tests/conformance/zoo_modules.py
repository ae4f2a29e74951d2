"""The conformance zoo: LightningModules written the way people write them, and their data.

Lightning's own demo classes are used as shipped (``BoringModel``, ``DemoModel``) or with the
smallest change that makes them run offline and fast (``LightningTransformer``: a tiny
``Transformer`` and random tokens instead of the WikiText-2 download). The others follow the
patterns of the Lightning docs and of common user code: a stock ``nn.TransformerEncoder`` language
model with decay / no-decay parameter groups, a torchvision ResNet, a HuggingFace model from a
tiny random config on dict batches, a two-optimizer manual-optimization GAN, a classifier that
collects its step outputs in a list, a module whose ``training_step`` returns a dict or ``None``,
and a linear regression (a quadratic loss, for exact answers).

Every module has ``user_state()``: the Python state the user's own code writes (lists, counters,
generators, caches), which the conformance contracts compare between runs. Data factories take
no RNG but the global one, so ``seed_everything`` before building makes a run reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.demos import LightningTransformer, Transformer
from lightning.pytorch.demos.boring_classes import BoringModel, DemoModel, RandomDataset
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics.utilities.imports import _XLA_AVAILABLE

VOCAB = 50
SEQ = 8

# torchmetrics checks for torch_xla lazily, through importlib.metadata, the first time an accuracy
# updates; inside a compiled training_step dynamo cannot trace that lookup
# (InternalTorchDynamoError: PackageNotFoundError). Resolve it once here, outside any compiled code.
bool(_XLA_AVAILABLE)


def user_state(module: pl.LightningModule) -> dict[str, Any]:
    """The module's own ``user_state()``, or ``{}`` for modules without Python state (the demos)."""
    method = getattr(module, "user_state", None)
    return method() if callable(method) else {}


# ---------------------------------------------------------------------------------- data
class RandomTokens(Dataset):
    """Next-token pairs ``(x[:-1], x[1:])`` of uniformly random token sequences."""

    def __init__(self, n: int = 32, seq: int = SEQ, vocab: int = VOCAB) -> None:
        self.tokens = torch.randint(0, vocab, (n, seq + 1))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.tokens[i, :-1], self.tokens[i, 1:]


class RandomTokenDicts(RandomTokens):
    """HuggingFace-style dict examples: ``input_ids``, ``attention_mask``, ``labels``."""

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        ids = self.tokens[i, :-1]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class RegressionDicts(Dataset):
    """Dict examples ``{"x": features, "y": target}`` of a noisy linear target."""

    def __init__(self, n: int = 32, features: int = 8) -> None:
        self.x = torch.randn(n, features)
        self.y = self.x @ torch.randn(features, 1) + 0.1 * torch.randn(n, 1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def classification(n: int = 32, features: int = 8, classes: int = 3) -> TensorDataset:
    x = torch.randn(n, features)
    y = (x @ torch.randn(features, classes)).argmax(dim=1)
    return TensorDataset(x, y)


def images(n: int = 16, classes: int = 3) -> TensorDataset:
    return TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, classes, (n,)))


# ------------------------------------------------------------------ Lightning's demo classes
class TinyLightningTransformer(LightningTransformer):
    """Lightning's ``LightningTransformer`` demo with a tiny ``Transformer`` and random tokens (offline)."""

    def __init__(self) -> None:
        super().__init__(vocab_size=VOCAB)
        self.model = Transformer(vocab_size=VOCAB, ninp=16, nhead=2, nhid=32, nlayers=1)

    def prepare_data(self) -> None:  # the demo downloads WikiText-2
        pass

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomTokens(), batch_size=4, shuffle=True)

    def user_state(self) -> dict[str, Any]:
        # the demo caches its masks and positional encodings as plain attributes on first use
        pe = self.model.pos_encoder.pe
        return {"src_mask": self.model.src_mask, "pe": None if pe is None else pe.shape}


# ------------------------------------------------------------------ user-style modules
class EncoderLM(pl.LightningModule):
    """A causal language model on a stock ``nn.TransformerEncoder`` (default SDPA attention path),
    AdamW with the usual decay / no-decay parameter groups, optionally a frozen embedding."""

    def __init__(
        self, d_model: int = 16, layers: int = 2, dropout: float = 0.1, lr: float = 3e-3, weight_decay: float = 0.01,
        frozen: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(1, SEQ, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=2 * d_model, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, VOCAB)
        if frozen:
            self.embed.requires_grad_(False)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        h = self.encoder(self.embed(tokens) + self.pos[:, :t], mask=mask, is_causal=True)
        return self.head(h)

    def _loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.hparams.lr)

    def user_state(self) -> dict[str, Any]:
        return {}


class ResNetClassifier(pl.LightningModule):
    """torchvision's ResNet-18 (batch norm, ReLU: many exact-zero gradients) with a torchmetrics accuracy."""

    def __init__(self, classes: int = 3, lr: float = 0.05) -> None:
        super().__init__()
        import torchvision

        self.net = torchvision.models.resnet18(num_classes=classes)
        self.lr = lr
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)

    def user_state(self) -> dict[str, Any]:
        return {}


class HFCausalLM(pl.LightningModule):
    """A HuggingFace GPT-2 from a tiny random config (no download), trained on dict batches."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0)
        self.model = GPT2LMHeadModel(config)
        self.lr = lr

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.model(**batch)
        self.log("train_loss", out.loss)
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def user_state(self) -> dict[str, Any]:
        return {}


class GAN(pl.LightningModule):
    """The Lightning docs' manual-optimization GAN: two optimizers, ``toggle_optimizer``,
    ``manual_backward``, ``self.log("g_loss")`` and ``self.log("d_loss")``."""

    def __init__(self, latent: int = 4, data_dim: int = 2, hidden: int = 16, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, data_dim))
        self.discriminator = nn.Sequential(nn.Linear(data_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, z: Tensor) -> Tensor:
        return self.generator(z)

    def adversarial_loss(self, logits: Tensor, real: bool) -> Tensor:
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return F.binary_cross_entropy_with_logits(logits, target)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        g_opt, d_opt = self.optimizers()
        z = torch.randn(real.shape[0], self.hparams.latent, device=self.device)

        self.toggle_optimizer(g_opt)
        g_loss = self.adversarial_loss(self.discriminator(self(z)), real=True)
        self.log("g_loss", g_loss, prog_bar=True)
        self.manual_backward(g_loss)
        g_opt.step()
        g_opt.zero_grad()
        self.untoggle_optimizer(g_opt)

        self.toggle_optimizer(d_opt)
        fake = self(z).detach()
        d_loss = (self.adversarial_loss(self.discriminator(real), True) + self.adversarial_loss(self.discriminator(fake), False)) / 2
        self.log("d_loss", d_loss, prog_bar=True)
        self.manual_backward(d_loss)
        d_opt.step()
        d_opt.zero_grad()
        self.untoggle_optimizer(d_opt)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (0.5, 0.999)
        g_opt = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=betas)
        d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=betas)
        return [g_opt, d_opt]

    def user_state(self) -> dict[str, Any]:
        return {}


def gan_generator_loss(module: GAN, batch: Any) -> Tensor:
    """A ``loss_fn`` for the callbacks: the generator's loss on fresh fakes (the discriminator fooled)."""
    (real,) = batch
    z = torch.randn(real.shape[0], module.hparams.latent, device=real.device)
    return module.adversarial_loss(module.discriminator(module(z)), True)


def gan_discriminator_loss(module: GAN, batch: Any) -> Tensor:
    """A ``loss_fn`` for the callbacks: the discriminator's loss on real data and fresh fakes."""
    (real,) = batch
    z = torch.randn(real.shape[0], module.hparams.latent, device=real.device)
    fake = module(z)
    return (module.adversarial_loss(module.discriminator(real), True) + module.adversarial_loss(module.discriminator(fake), False)) / 2


def gan_data() -> TensorDataset:
    return TensorDataset(0.5 * torch.randn(64, 2) + 1.0)


class CollectingClassifier(pl.LightningModule):
    """The Lightning docs pattern: ``self.training_step_outputs.append(loss)`` in ``training_step``,
    their mean logged and the list cleared in ``on_train_epoch_end``; plus a batch counter, a
    ``torch.Generator`` of its own for input noise, a torchmetrics accuracy, optional validation,
    a frozen first layer with two parameter groups, and ``ReduceLROnPlateau``."""

    def __init__(
        self,
        features: int = 8,
        hidden: int = 16,
        classes: int = 3,
        dropout: float = 0.1,
        lr: float = 0.1,
        momentum: float = 0.9,
        noise: float = 0.01,
        frozen: bool = False,
        head_lr: float = 0.02,
        scheduler: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, classes))
        if frozen:
            self.encoder[0].requires_grad_(False)
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=classes)
        self.training_step_outputs: list[Tensor] = []
        self.epoch_means: list[float] = []
        self.batches_seen = 0
        self.noise_generator = torch.Generator().manual_seed(1234)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        x = x + self.hparams.noise * torch.randn(x.shape, generator=self.noise_generator).to(x)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.batches_seen += 1
        self.training_step_outputs.append(loss)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def on_train_epoch_end(self) -> None:
        epoch_mean = torch.stack(self.training_step_outputs).mean()
        self.log("training_epoch_mean", epoch_mean)
        self.epoch_means.append(float(epoch_mean))
        self.training_step_outputs.clear()  # free memory

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        if self.hparams.frozen:
            params: Any = [
                {"params": self.encoder.parameters()},
                {"params": self.head.parameters(), "lr": self.hparams.head_lr},
            ]
        else:
            params = self.parameters()
        optimizer = torch.optim.SGD(params, lr=self.hparams.lr, momentum=self.hparams.momentum)
        if self.hparams.scheduler == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}
        return optimizer

    def user_state(self) -> dict[str, Any]:
        return {
            "training_step_outputs": [t.detach() for t in self.training_step_outputs],
            "epoch_means": list(self.epoch_means),
            "batches_seen": self.batches_seen,
            "noise_generator": self.noise_generator.get_state(),
        }


class SkippingRegressor(pl.LightningModule):
    """Dict batches; ``training_step`` returns ``{"loss": ..., "pred": ...}``, or ``None`` to skip
    every third batch (Lightning then skips the backward and the optimizer step)."""

    def __init__(self, features: int = 8, hidden: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.skipped_batches: list[int] = []

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor] | None:
        pred = self.net(batch["x"])
        loss = F.mse_loss(pred, batch["y"])
        if batch_idx % 3 == 2:
            self.skipped_batches.append(batch_idx)
            return None
        self.log("train_mse", loss)
        return {"loss": loss, "pred": pred.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def user_state(self) -> dict[str, Any]:
        return {"skipped_batches": list(self.skipped_batches)}


class LinearRegression(pl.LightningModule):
    """Least squares with plain SGD: a quadratic loss, so Hessian and exponents are known exactly."""

    def __init__(self, features: int = 3, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.linear = nn.Linear(features, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self.linear(x), y)
        self.log("train_mse", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def user_state(self) -> dict[str, Any]:
        return {}


def regression(n: int = 16, features: int = 3) -> TensorDataset:
    x = torch.randn(n, features) * torch.tensor([2.0, 1.0, 0.5])
    return TensorDataset(x, x @ torch.randn(features, 1) + 0.1 * torch.randn(n, 1))


# ---------------------------------------------------------------------------------- the zoo
@dataclass(frozen=True)
class Species:
    """How to build one zoo module and its training (and validation) data."""

    make: Callable[..., pl.LightningModule]
    train: Callable[[], DataLoader | None]
    val: Callable[[], DataLoader] | None = None


def _loader(dataset: Callable[[], Dataset], batch_size: int, shuffle: bool = True) -> Callable[[], DataLoader]:
    return lambda: DataLoader(dataset(), batch_size=batch_size, shuffle=shuffle)


ZOO: dict[str, Species] = {
    # BoringModel brings its own loader (64 random vectors, batch size 1), SGD and StepLR
    "boring": Species(BoringModel, lambda: None),
    "demo": Species(DemoModel, _loader(lambda: RandomDataset(32, 64), 8)),
    "lightning_transformer": Species(TinyLightningTransformer, lambda: None),
    "encoder_lm": Species(EncoderLM, _loader(RandomTokens, 4), _loader(lambda: RandomTokens(8), 4, shuffle=False)),
    "resnet": Species(ResNetClassifier, _loader(images, 4)),
    "hf_gpt2": Species(HFCausalLM, _loader(RandomTokenDicts, 4)),
    "gan": Species(GAN, _loader(gan_data, 8)),
    "collecting": Species(
        CollectingClassifier, _loader(classification, 8), _loader(lambda: classification(16), 8, shuffle=False)
    ),
    "skipping": Species(SkippingRegressor, _loader(RegressionDicts, 8)),
    "linear": Species(LinearRegression, _loader(regression, 16, shuffle=False)),
}
