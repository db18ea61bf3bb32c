"""Callbacks that start the agent inside Lightning and Transformers.

When a framework's wandb logger creates the run, somewhere inside
``fit()`` or ``train()``, the training script has no line of its own
after ``wandb.init`` where it could call ``agent.init``.  These callbacks
make that call at the first moment the run exists, on the process that
logs (global rank zero), with the keyword arguments they were given::

    from wandb_offline_sync.integrations import lightning_callback
    trainer = lightning.pytorch.Trainer(
        logger=WandbLogger(project="my-project"),
        callbacks=[lightning_callback(frequency=300)])

    from wandb_offline_sync.integrations import transformers_callback
    trainer = transformers.Trainer(
        model=model, train_dataset=data,
        args=TrainingArguments(..., report_to=["wandb"]),
        callbacks=[transformers_callback(frequency=300)])

The classes are ``LightningCallback`` (for ``lightning.pytorch``),
``PyTorchLightningCallback`` (for ``pytorch_lightning``) and
``TransformersCallback``.  They are built when first asked for, as
attributes of this module (PEP 562), so importing the module needs only
the standard library and asking for a class imports its framework alone.
They stay out of ``__all__``: a star import would import every framework.
``lightning_callback()`` picks the Lightning namespace the job has
imported, ``lightning.pytorch`` when it cannot tell.

When the run exists:

- Lightning creates the run of each ``WandbLogger`` just before the
  callbacks' ``setup``; the callback reads ``logger.experiment`` there too
  (it creates the run on versions that create it later), then looks
  again at ``on_train_start`` and each ``on_train_batch_end`` for a run
  that the job's own code starts.
- Transformers puts the ``report_to`` callbacks before the job's own, so
  ``WandbCallback.on_train_begin`` has created the run when ours runs.
  When the order is otherwise, the callback looks again at each
  ``on_step_end`` and ``on_log`` until the run exists.

Once started, the agent follows ``wandb.run`` by itself and the callback
does nothing more: one attribute check per step.  Neither framework
finishes the run at the end of training; the agent does it at exit and
then sends the final request.  Use either the callback or a call of
``agent.init`` in the job, not both: a second ``agent.init`` replaces the
first agent.

Nothing here raises into training.  Bad keyword arguments raise
``TypeError`` when the callback is made; after that a failure is reported
once as a :class:`~wandb_offline_sync.agent.FarmWarning` and the callback
stops trying.  A training that ends with no wandb run is reported the
same way.

Only single-process training is tested.  With several processes only
global rank zero starts an agent, which is where both frameworks keep
the run.
"""

import importlib
import importlib.util
import inspect
import logging
import sys
import threading
import warnings

from . import agent

__all__ = ["lightning_callback", "transformers_callback"]

log = logging.getLogger(__name__)
log.addHandler(logging.NullHandler())

_AGENT_PARAMETERS = inspect.signature(agent.init)


class _AgentStarter:
    """Calls ``agent.init`` once, the first time a wandb run exists.

    The framework-specific classes below mix this into their framework's
    callback base class.
    """

    def __init__(self, **agent_kwargs):
        _AGENT_PARAMETERS.bind(**agent_kwargs)   # TypeError now, not later
        super().__init__()
        self.agent_kwargs = agent_kwargs
        #: The Agent this callback started (None before, or on failure).
        self.agent = None
        # True once the agent started, or on a process that does not log,
        # or after a failure: the hooks then return at once.
        self._settled = False
        self._warned = False

    def _start_agent(self, is_logging_process, create_run=None):
        """Start the agent if a wandb run exists now; never raises.

        ``is_logging_process`` and ``create_run`` are called here, inside
        the guard, since both read framework state.
        """
        if self._settled:
            return
        try:
            if not is_logging_process():
                self._settled = True
                return
            if create_run is not None:
                create_run()
            if agent._current_wandb_run() is None:
                return
            self._settled = True
            self.agent = agent.init(**self.agent_kwargs)
            log.info("agent started by %s", type(self).__name__)
        except Exception as exc:
            self._settled = True
            self._warn("%s stopped: %s: %s" % (type(self).__name__,
                                               type(exc).__name__, exc))

    def _check_started(self, is_logging_process):
        """At the end of training: say once if no run ever appeared."""
        self._start_agent(is_logging_process)
        if not self._settled:
            self._warn("%s: training ended without a wandb run, so the "
                       "agent did not start; is wandb logging on?"
                       % type(self).__name__)

    def _warn(self, message):
        if self._warned:
            log.debug("%s", message)
            return
        self._warned = True
        log.warning("%s", message)
        try:
            warnings.warn(message, agent.FarmWarning, stacklevel=3)
        except Exception:
            pass        # warnings configured as errors must not escape


def _is_wandb_logger(logger):
    # By name, so that a logger of either Lightning namespace, or a
    # subclass of one, is recognised without importing the other.
    return any(cls.__name__ == "WandbLogger" for cls in type(logger).__mro__)


def _build_lightning_class(package):
    base = importlib.import_module(package + ".callbacks").Callback

    class Callback(_AgentStarter, base):

        def setup(self, trainer, pl_module, stage):
            def create_run():
                for logger in trainer.loggers:
                    if _is_wandb_logger(logger):
                        logger.experiment     # creates the run on rank 0
            self._start_agent(lambda: trainer.is_global_zero, create_run)

        def on_train_start(self, trainer, pl_module):
            self._start_agent(lambda: trainer.is_global_zero)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch,
                               batch_idx):
            if not self._settled:
                self._start_agent(lambda: trainer.is_global_zero)

        def on_train_end(self, trainer, pl_module):
            self._check_started(lambda: trainer.is_global_zero)

    return Callback


def _build_transformers_class():
    from transformers import TrainerCallback

    class Callback(_AgentStarter, TrainerCallback):

        def on_train_begin(self, args, state, control, **kwargs):
            self._start_agent(lambda: state.is_world_process_zero)

        def on_step_end(self, args, state, control, **kwargs):
            if not self._settled:
                self._start_agent(lambda: state.is_world_process_zero)

        on_log = on_step_end

        def on_train_end(self, args, state, control, **kwargs):
            self._check_started(lambda: state.is_world_process_zero)

    return Callback


_BUILDERS = {
    "LightningCallback": lambda: _build_lightning_class("lightning.pytorch"),
    "PyTorchLightningCallback":
        lambda: _build_lightning_class("pytorch_lightning"),
    "TransformersCallback": _build_transformers_class,
}
_build_lock = threading.Lock()   # one class per name, for pickle's sake


def __getattr__(name):
    build = _BUILDERS.get(name)
    if build is None:
        raise AttributeError("module %r has no attribute %r"
                             % (__name__, name))
    with _build_lock:
        cls = globals().get(name)
        if cls is None:
            cls = build()
            # Named as an attribute of this module, so that pickle (used
            # by Lightning's ddp_spawn) finds the class again by name.
            cls.__name__ = cls.__qualname__ = name
            cls.__module__ = __name__
            globals()[name] = cls
    return cls


def __dir__():
    return sorted(set(globals()) | set(_BUILDERS))


def lightning_callback(**agent_kwargs):
    """A Lightning callback that calls ``agent.init(**agent_kwargs)``.

    Its class is from ``pytorch_lightning`` when the job imported that
    namespace and not ``lightning``, or when ``lightning`` is missing;
    otherwise from ``lightning.pytorch``.
    """
    old_only = "pytorch_lightning" in sys.modules and \
        "lightning" not in sys.modules
    if old_only or importlib.util.find_spec("lightning") is None:
        return __getattr__("PyTorchLightningCallback")(**agent_kwargs)
    return __getattr__("LightningCallback")(**agent_kwargs)


def transformers_callback(**agent_kwargs):
    """A Transformers ``TrainerCallback`` that calls
    ``agent.init(**agent_kwargs)``."""
    return __getattr__("TransformersCallback")(**agent_kwargs)
