"""A real client: pytorch-metric-learning's own trainer with our ArcFaceLoss (docs/compat.md).

`trainers.MetricLossOnly` trains a small embedding network on the UCI 8×8 digits (offline, from
scikit-learn) with pytorch-metric-learning's ArcFaceLoss and with ours — the one-import change —
three seeds each. The k-nearest-neighbour accuracy of the test embeddings (scikit-learn, cosine
metric) must agree within one point on the mean. faiss is blocked from importing: the trainer
path must not need it. About 10 s on two cores.
"""

import logging
import sys

import pytest
import torch

pml_trainers = pytest.importorskip("pytorch_metric_learning.trainers")
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402

import udat_kernels.compat.pml as ours  # noqa: E402
from udat_kernels.udat.data import load_digits  # noqa: E402

SEEDS = (0, 1, 2)
EPOCHS = 5
EMBEDDING = 32


def _flat(images):
    return images.float().div(255).flatten(1)


def train_and_score(loss_cls, seed, train, test):
    """Train trunk + loss with MetricLossOnly; kNN (k = 5) accuracy, %, on the test split."""
    torch.manual_seed(seed)
    trunk = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, EMBEDDING))
    loss = loss_cls(num_classes=10, embedding_size=EMBEDDING)  # its defaults: 28.6°, s = 64
    trainer = pml_trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": torch.nn.Identity()},
        optimizers={"trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=1e-3),
                    "metric_loss_optimizer": torch.optim.Adam(loss.parameters(), lr=1e-2)},
        batch_size=64, loss_funcs={"metric_loss": loss},
        dataset=torch.utils.data.TensorDataset(*train), data_device=torch.device("cpu"),
        dataloader_num_workers=0)
    trainer.train(num_epochs=EPOCHS)
    trunk.eval()
    with torch.no_grad():
        train_emb, test_emb = trunk(train[0]), trunk(test[0])
    knn = KNeighborsClassifier(n_neighbors=5, metric="cosine")
    knn.fit(train_emb.numpy(), train[1].numpy())
    return 100.0 * knn.score(test_emb.numpy(), test[1].numpy()), loss


# the trainer formats its loss tensor for the progress bar
@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_metric_loss_only_trainer_ours_matches_pml(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide network: one thread is as fast, and immune to a busy CPU
    try:
        _train_both(monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _train_both(monkeypatch):
    logging.getLogger("PML").setLevel(logging.WARNING)
    calls = []
    fused = ours.angular_margin_cross_entropy

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(ours, "angular_margin_cross_entropy", counting)
    digits = load_digits(size=8)
    train = (_flat(digits.train.images), digits.train.labels)
    test = (_flat(digits.test.images), digits.test.labels)

    theirs = [train_and_score(pml_losses.ArcFaceLoss, s, train, test)[0] for s in SEEDS]
    mine = []
    for s in SEEDS:
        acc, loss = train_and_score(ours.ArcFaceLoss, s, train, test)
        mine.append(acc)
        assert ours.is_class_major(loss.W)
    steps_per_run = len(train[1]) // 64 * EPOCHS  # the trainer drops the last partial batch
    assert len(calls) == steps_per_run * len(SEEDS)  # every step went through the fused op
    mean_theirs, mean_mine = sum(theirs) / len(SEEDS), sum(mine) / len(SEEDS)
    print(f"kNN accuracy, %: pytorch-metric-learning {theirs} mean {mean_theirs:.1f}; "
          f"ours {mine} mean {mean_mine:.1f}")  # shown with pytest -s (docs/compat.md)
    assert mean_theirs > 90 and mean_mine > 90, (theirs, mine)  # both really learned
    assert abs(mean_mine - mean_theirs) <= 1.0, (theirs, mine)
