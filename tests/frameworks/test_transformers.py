"""A real Transformers Trainer whose WandbCallback creates the run and
whose only sync code is the callback; the run ends complete on the fake
W&B server, through a real farm running the real wandb CLI."""

import pytest

from conftest import wait_until
from .conftest import farm_record, printed, run_job

pytestmark = pytest.mark.frameworks
REQUIRES = ("transformers", "accelerate", "torch")

STEPS = 40

# A one-layer BERT built from its config (nothing is downloaded) learns
# random labels of random tokens.  ``report_to`` adds WandbCallback before
# the job's callbacks; ``callback_first`` puts ours before it, so that the
# run does not exist yet at our on_train_begin.  Each step sleeps a
# little, so that the agent asks for syncs during training.
TRAIN = """
import sys, time
import torch
import wandb
from transformers import (BertConfig, BertForSequenceClassification,
                          Trainer, TrainerCallback, TrainingArguments)
from transformers.integrations import WandbCallback
from wandb_offline_sync.integrations import transformers_callback


class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.05)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, size):
        self.input_ids = torch.randint(0, 50, (size, 12))
        self.labels = torch.randint(0, 2, (size,))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


order, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(
    vocab_size=50, hidden_size=16, num_hidden_layers=1,
    num_attention_heads=2, intermediate_size=32,
    max_position_embeddings=16, num_labels=2))
callback = transformers_callback(frequency=1)
if order == "report_to":
    report_to, callbacks = ["wandb"], [callback, Slow()]
else:
    report_to, callbacks = "none", [callback, WandbCallback(), Slow()]
args = TrainingArguments(
    output_dir="out", run_name="tiny-bert", report_to=report_to,
    max_steps=steps, per_device_train_batch_size=4, logging_steps=1,
    save_strategy="no", use_cpu=True, disable_tqdm=True,
    dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(160),
                  callbacks=callbacks)
print("order", *[type(c).__name__
                 for c in trainer.callback_handler.callbacks])
trainer.train()
print("run", wandb.run.id)
print("agent_started", callback.agent is not None)
"""


@pytest.mark.parametrize("order", ["report_to", "callback_first"])
def test_transformers_run_is_synced_through_the_callback(
        order, live_farm, fake, tmp_path):
    code, stdout, stderr = run_job(live_farm, tmp_path, TRAIN, order,
                                   STEPS)

    assert code == 0, stderr
    names = printed(stdout, "order")
    ours, theirs = (names.index("TransformersCallback"),
                    names.index("WandbCallback"))
    assert (ours < theirs) == (order == "callback_first"), names
    assert printed(stdout, "agent_started") == ["True"]
    run_id, = printed(stdout, "run")
    assert fake.wait_for(
        lambda f: f.final_state(run_id) == {"complete": True,
                                            "exitcode": 0}, 60), \
        fake.states(run_id)
    assert fake.runs() == [run_id]
    losses = {row["train/global_step"]: row["train/loss"]
              for row in fake.history(run_id) if "train/loss" in row}
    assert sorted(losses) == list(range(1, STEPS + 1))
    # The final state can arrive before the sync's last config update:
    # the config is checked once the farm's sync has ended.
    assert wait_until(
        lambda: farm_record(live_farm, run_id)["state"] == "done", 30)
    assert fake.config_values(run_id)["max_steps"] == STEPS
    record = farm_record(live_farm, run_id)
    # Asked for during training too, not only by the final request.
    assert record["requests"] >= 2, record
    assert record["final_requested"]
