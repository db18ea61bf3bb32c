"""A real Lightning training whose WandbLogger creates the run and whose
only sync code is the callback; the run ends complete on the fake W&B
server, through a real farm running the real wandb CLI."""

import pytest

from conftest import wait_until
from .conftest import farm_record, printed, run_job

pytestmark = pytest.mark.frameworks
REQUIRES = ("lightning", "pytorch_lightning", "torch")

STEPS = 64

# Two epochs of 32 batches of a 2-layer model on random tensors, logged
# by a WandbLogger or ("none") by nothing.  Each step sleeps a little, so
# that the agent asks for syncs during training.
TRAIN = """
import importlib, sys, time
import torch
from torch.utils.data import DataLoader, TensorDataset
from wandb_offline_sync.integrations import lightning_callback

pl = importlib.import_module(sys.argv[1])
WandbLogger = importlib.import_module(sys.argv[1] + ".loggers").WandbLogger


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        time.sleep(0.05)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


torch.manual_seed(0)
x = torch.randn(256, 8)
data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
callback = lightning_callback(frequency=1)
logger = False
if sys.argv[2] == "wandb":
    logger = WandbLogger(project="frameworks", offline=True)
trainer = pl.Trainer(
    max_epochs=2, accelerator="cpu", devices=1, log_every_n_steps=1,
    logger=logger, callbacks=[callback], enable_progress_bar=False,
    enable_checkpointing=False, enable_model_summary=False)
trainer.fit(Tiny(), data)
print("callback", type(callback).__module__, type(callback).__name__)
print("agent_started", callback.agent is not None)
if logger:
    print("run", logger.experiment.id)
"""


@pytest.mark.parametrize("namespace", ["lightning.pytorch",
                                       "pytorch_lightning"])
def test_lightning_run_is_synced_through_the_callback(
        namespace, live_farm, fake, tmp_path):
    code, stdout, stderr = run_job(live_farm, tmp_path, TRAIN, namespace,
                                   "wandb")

    assert code == 0, stderr
    expected = "PyTorchLightningCallback" \
        if namespace == "pytorch_lightning" else "LightningCallback"
    assert printed(stdout, "callback") == [
        "wandb_offline_sync.integrations", expected]
    assert printed(stdout, "agent_started") == ["True"]
    run_id, = printed(stdout, "run")
    assert fake.wait_for(
        lambda f: f.final_state(run_id) == {"complete": True,
                                            "exitcode": 0}, 60), \
        fake.states(run_id)
    assert fake.runs() == [run_id]
    losses = {row["trainer/global_step"]: row["train_loss"]
              for row in fake.history(run_id) if "train_loss" in row}
    assert sorted(losses) == list(range(STEPS))
    assert all(loss >= 0 for loss in losses.values())
    record = farm_record(live_farm, run_id)
    # Asked for during training too, not only by the final request.
    assert record["requests"] >= 2, record
    assert record["final_requested"]
    assert wait_until(
        lambda: farm_record(live_farm, run_id)["state"] == "done", 30)


def test_lightning_training_without_wandb_warns_once_and_goes_on(
        live_farm, tmp_path):
    code, stdout, stderr = run_job(live_farm, tmp_path, TRAIN,
                                   "lightning.pytorch", "none")

    assert code == 0, stderr
    assert printed(stdout, "agent_started") == ["False"]
    assert stderr.count("training ended without a wandb run") == 1, stderr
    assert live_farm[1].status()["runs"] == []
