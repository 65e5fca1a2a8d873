"""The training loop's parts: Adam, checkpoints and resume, losses, schedules, early stopping, progress bar,
truncated BPTT; transfer learning from a shipped bundle; ensembles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.core.model import load_bundle
from training.data import prepare
from simulation.synth import FleetConfig, generate_fleet
from training.train import LeanAdam, TrainConfig, fit

pytestmark = pytest.mark.training


@pytest.fixture(scope="module")
def prepared():
    rows = generate_fleet(FleetConfig(devices=1, hours=10.0, seed=9, faults="none")).rows
    return prepare(rows, lookback=20, horizon=3)


def _cfg(**extra) -> TrainConfig:
    base = dict(lookback=20, horizon=3, hidden_size=8, num_layers=1, epochs=3, batch_size=32, max_batches=3,
                architecture="many_to_one", dropout=0.2, patience=10, lr_schedule="plateau")
    return TrainConfig(**{**base, **extra})


def test_lean_adam_matches_torch_adam():
    """LeanAdam (no torch._dynamo import) takes exactly the steps torch.optim.Adam takes, weight decay included."""
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    lean = LeanAdam(a.parameters(), lr=1e-2, weight_decay=0.01)
    ref = torch.optim.Adam(b.parameters(), lr=1e-2, weight_decay=0.01, foreach=False)
    for _ in range(5):
        x = torch.randn(8, 5)
        for model, opt in ((a, lean), (b, ref)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_checkpoint_resume_continues_exactly(prepared, tmp_path):
    """Two epochs, a checkpoint, then resume to three: the same weights and history as three epochs at once."""
    straight = fit(prepared, _cfg(), log=lambda *_: None)
    ck = str(tmp_path / "ck.pt")
    fit(prepared, _cfg(epochs=2, checkpoint=ck), log=lambda *_: None)
    resumed = fit(prepared, _cfg(checkpoint=ck, resume=True), log=lambda *_: None)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["val_loss"] for h in resumed.history] == pytest.approx([h["val_loss"] for h in straight.history], rel=1e-6)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_losses_differ_and_unknown_loss_is_refused(prepared):
    """MSE, MAE and Huber train to different weights; an unknown loss name is a clear error."""
    finals = {name: fit(prepared, _cfg(loss=name, epochs=1), log=lambda *_: None).history[0]["train_loss"]
              for name in ("mse", "mae", "huber")}
    assert len(set(finals.values())) == 3
    with pytest.raises(ValueError, match="unknown loss"):
        fit(prepared, _cfg(loss="mape"), log=lambda *_: None)


def test_plateau_halves_the_rate_and_early_stopping_ends_the_run(prepared):
    """With a stalled validation loss the rate drops after `plateau_patience` epochs and training stops after `patience`."""
    result = fit(prepared, _cfg(learning_rate=1e-9, epochs=10, patience=3, lr_schedule="plateau", plateau_patience=1,
                                min_learning_rate=0.0), log=lambda *_: None)
    lrs = [h["lr"] for h in result.history]
    assert len(result.history) == 4 and result.best_epoch == 1
    assert lrs[0] == lrs[1] == lrs[2] == 1e-9 and lrs[3] == pytest.approx(5e-10)


def test_progress_bar_shows_live_losses(prepared, capsys):
    """progress=True draws a tqdm bar whose postfix carries the running training loss."""
    fit(prepared, _cfg(epochs=1, progress=True), log=lambda *_: None)
    assert "train=" in capsys.readouterr().err


def test_truncated_bptt_stops_gradients_before_the_last_steps():
    """tbptt=N: the whole window runs forward but only the last N steps receive gradient."""
    from training.architectures import CoreConfig, ManyToOne

    core = ManyToOne(3, 2, 4, CoreConfig(hidden_size=6, num_layers=2, dropout=0.0, tbptt=5)).train()
    torch.nn.init.normal_(core.head[-1].weight)
    x = torch.randn(2, 30, 3, requires_grad=True)
    core(x).sum().backward()
    assert (x.grad[:, :25] == 0).all() and (x.grad[:, 25:].abs() > 0).any()
    core.eval()
    with torch.no_grad():
        full = core(x)
    core.tbptt = 0
    with torch.no_grad():
        assert torch.allclose(core(x), full)  # inference always sees the whole window


def test_micro_batches_add_up_to_the_whole_batch(prepared):
    """Gradients summed over micro-batches take the same step as the whole batch in one pass."""
    whole = fit(prepared, _cfg(dropout=0.0, precision="fp32", micro_batch=0, epochs=1), log=lambda *_: None)
    chunked = fit(prepared, _cfg(dropout=0.0, precision="fp32", micro_batch=8, epochs=1), log=lambda *_: None)
    assert chunked.history[0]["train_loss"] == pytest.approx(whole.history[0]["train_loss"], rel=1e-5)
    for p, q in zip(whole.model.parameters(), chunked.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("architecture", ["many_to_one", "encoder_decoder"])
def test_worker_threads_follow_the_seed(prepared, architecture):
    """Micro-batches in two worker threads (dropout between layers and in the head, teacher forcing) give the
    same weights as in one thread, run after run."""
    cfg = dict(architecture=architecture, num_layers=2, dropout=0.3, micro_batch=8, epochs=2, precision="fp32")
    one = fit(prepared, _cfg(threads=1, **cfg), log=lambda *_: None)
    two = [fit(prepared, _cfg(threads=2, **cfg), log=lambda *_: None) for _ in range(2)]
    for run in two:
        assert [h["train_loss"] for h in run.history] == pytest.approx([h["train_loss"] for h in one.history], rel=1e-6)
        for p, q in zip(one.model.parameters(), run.model.parameters()):
            assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_layer_by_layer_lstm_computes_what_nn_lstm_computes(bidirectional):
    """run_lstm (layers one at a time, dropout from the thread's stream) equals nn.LSTM: outputs and final states."""
    from training.architectures import run_lstm

    lstm = torch.nn.LSTM(3, 5, 3, batch_first=True, bidirectional=bidirectional, dropout=1e-9)  # keeps ~every unit
    x = torch.randn(4, 7, 3)
    state = tuple(torch.randn(3 * (2 if bidirectional else 1), 4, 5) for _ in range(2))
    with torch.no_grad():
        expected, (h, c) = lstm.eval()(x, state)
        got, (h2, c2) = run_lstm(lstm.train(), x, state)
    assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(h2, h, atol=1e-6) and torch.allclose(c2, c, atol=1e-6)


def test_training_flushes_denormals_only_while_it_trains():
    """Denormals flush to zero inside training (LSTM backward through long windows slows ~10x on them), not after it."""
    from training.train import denormals_flushed

    def tiny_product() -> float:
        return (torch.tensor([1e-30]) * torch.tensor([1e-10])).item()

    assert tiny_product() != 0.0  # importing the training loop left the process's floating point alone
    with denormals_flushed():
        assert tiny_product() == 0.0
    assert tiny_product() != 0.0


def test_fit_leaves_the_floating_point_mode_as_it_found_it(prepared):
    """After fit() the thread computes denormals again (hypothesis and numerical code rely on them)."""
    fit(prepared, TrainConfig(lookback=prepared.lookback, horizon=prepared.horizon, hidden_size=4, num_layers=1,
                              epochs=1, max_batches=1, threads=1), log=lambda *_: None)
    assert (torch.tensor([1e-30]) * torch.tensor([1e-10])).item() != 0.0


def test_bf16_training_runs_or_is_refused_with_a_clear_error(prepared):
    """precision=bf16 (autocast) trains to a finite validation loss where the CPU has a bf16 LSTM, else says why."""
    from training.train import bf16_lstm_available

    if not bf16_lstm_available():
        with pytest.raises(ValueError, match="precision=bf16: this CPU's oneDNN has no bfloat16 LSTM"):
            fit(prepared, _cfg(precision="bf16", epochs=1), log=lambda *_: None)
        return
    result = fit(prepared, _cfg(precision="bf16", epochs=1), log=lambda *_: None)
    assert np.isfinite(result.best_val_loss)


def test_shipped_bundle_rebuilds_in_pytorch_and_fine_tunes(prepared):
    """The shipped ONNX turns back into PyTorch weights with the same outputs; fine-tuning never ends worse on validation."""
    from training.cli import SHIPPED_DIR
    from training.train import evaluate_loss
    from training.transfer import model_from_bundle, scaler_from_manifest

    model, manifest = model_from_bundle(SHIPPED_DIR)
    bundle = load_bundle(SHIPPED_DIR)
    rows = generate_fleet(FleetConfig(devices=1, hours=12.0, seed=21, faults="none")).rows
    data = prepare(rows, manifest["lookback"], manifest["horizon"], fitted_scaler=scaler_from_manifest(manifest))
    x, _ = data.windows(data.starts["val"][:16])
    with torch.no_grad():
        assert np.abs(model(torch.from_numpy(x)).numpy() - bundle.run_scaled(x)).max() <= 1e-5
    before = evaluate_loss(model, data, data.starts["val"], 256)
    for p in model.lstm.parameters():
        p.requires_grad_(False)
    cfg = TrainConfig(hidden_size=manifest["architecture"]["hidden_size"], num_layers=manifest["architecture"]["num_layers"],
                      epochs=1, max_batches=2, learning_rate=1e-3)
    lstm_before = [p.clone() for p in model.lstm.parameters()]
    tuned = fit(data, cfg, log=lambda *_: None, model=model)
    assert tuned.best_val_loss <= before + 1e-9
    assert all(torch.equal(a, b) for a, b in zip(lstm_before, tuned.model.lstm.parameters()))  # frozen stays frozen


def test_ensemble_is_the_mean_of_its_members_and_loads_in_the_daemon(prepared, tmp_path):
    """One graph averages the members; the bundle loads in agent.core.model.load_bundle like any other."""
    from training.bundle import export_bundle
    from training.ensemble import EnsembleForecaster

    members = [fit(prepared, _cfg(architecture=a, strategy=s, epochs=1, seed=i), log=lambda *_: None).model
               for i, (a, s) in enumerate((("many_to_one", "mimo"), ("attention", "recursive")))]
    ensemble = EnsembleForecaster(members).eval()
    x = torch.from_numpy(prepared.windows(prepared.starts["test"][:4])[0])
    with torch.no_grad():
        assert torch.allclose(ensemble(x), (members[0](x) + members[1](x)) / 2, atol=1e-6)
    manifest = export_bundle(ensemble, prepared, _cfg(), tmp_path / "ens", name="ens", reports=False, log=lambda *_: None)
    assert manifest["architecture"]["type"] == "ensemble" and len(manifest["architecture"]["members"]) == 2
    assert load_bundle(tmp_path / "ens").predict(prepared.scaler.inverse(x.numpy()).astype(np.float32)).shape == (4, 3, 4)
