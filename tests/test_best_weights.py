"""Early stopping keeps the best epoch: a phase ends with the weights of its best validation epoch."""
from __future__ import annotations

import numpy as np
import torch

from dr_model.best_weights import best_epoch
from dr_model.config import DRConfig
from dr_model.mstep import initial_assignment
from dr_model.schedule import Phase
from dr_model.trainer import new_model, run_phase

CFG = DRConfig.from_dict({
    "model": {"K": 8, "D": 2, "J": 2, "item_dim": 16, "user_dim": 16, "node_dim": 8, "hidden": 32,
              "rerank_dim": 16, "seq_len": 5},
    "train": {"batch_size": 64, "lr": 1e-2, "seed": 0, "patience": 3},
})
V = 50


def _data() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, V, (400, CFG.model.seq_len), generator=g)
    return seq, torch.randint(0, V, (400,), generator=g), initial_assignment(V, CFG.model.J, CFG.model.num_paths, 0)


def _run(values: list[float], phase: Phase) -> tuple[torch.nn.Module, list[dict], list[dict[str, torch.Tensor]]]:
    """run_phase with validation figures given in advance; also the weights each validation saw."""
    torch.manual_seed(0)
    model = new_model(CFG, V)
    seen: list[dict[str, torch.Tensor]] = []
    figures = iter(values)

    def valid(m, ph, assign):
        seen.append({n: p.detach().clone() for n, p in m.named_parameters()})
        return next(figures)

    seq, target, assign = _data()
    lines: list[str] = []
    rows = run_phase(model, seq, target, assign, CFG, phase, valid, lines.append)
    return model, rows, seen


def _equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, state[n]) for n, p in model.named_parameters())


def test_an_early_stopped_phase_ends_with_its_best_epoch():
    model, rows, seen = _run([0.2, 0.5, 0.4, 0.3, 0.1, 0.9], Phase("joint", 10, True, True, 1))
    assert len(rows) == 5                       # best at epoch 2, patience 3: stops after epoch 5
    assert _equal(model, seen[1]) and not _equal(model, seen[4])


def test_a_phase_whose_last_epoch_is_best_keeps_it_and_a_frozen_tower_never_moves():
    model, rows, seen = _run([0.1, 0.2, 0.3], Phase("joint", 3, True, True, 1))
    assert len(rows) == 3 and _equal(model, seen[2])
    model, rows, seen = _run([0.3, 0.2, 0.25], Phase("structure", 3, False, True, 2))
    assert _equal(model, seen[0]) and not _equal(model, seen[2])
    torch.manual_seed(0)
    start = dict(new_model(CFG, V).named_parameters())
    frozen = [n for n, _ in model.named_parameters() if n.startswith(("reranker.", "rerank_encoder."))]
    assert frozen and all(torch.equal(dict(model.named_parameters())[n], start[n]) for n in frozen)


def test_best_epoch_is_the_first_of_equal_figures_and_none_without_figures():
    assert best_epoch([{"valid_recall": 0.2}, {"valid_recall": 0.4}, {"valid_recall": 0.4}]) == 1
    assert best_epoch([{"valid_recall": None}, {}]) is None
