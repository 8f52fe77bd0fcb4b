"""CPU stand-ins for the GPU parts of verl 0.9.1, so that verl's real ``RayPPOTrainer.fit()`` runs in a test.

Only what needs a GPU in verl is replaced; each stand-in keeps the call shapes and data layouts of the
verl class it replaces:

* ``CPUActorRolloutRefWorker`` + ``InProcessWorkerGroup`` replace verl's FSDP engine worker
  (``verl/workers/engine_workers.py::ActorRolloutRefWorker``) on a ``RayWorkerGroup``: the tiny HF
  model in the driver process, the no-padding TensorDict layout of the FSDP engine for ``log_probs``
  and ``entropy``, verl's own ``ppo_loss`` (or whatever ``set_loss_fn`` installed), verl's
  mini-batch iterator and micro-batch split, AdamW from verl's ``build_optimizer``.
* ``CPUHybridRollout`` / ``CPUReplica`` / ``CPULLMServerManager`` replace the vLLM server that lives
  in the actor workers (hybrid engine) and ``LLMServerManager``. They follow vLLM's level-2 sleep:
  after ``sleep`` the weights are gone; ``wake_up`` maps memory back but only ``update_weights``
  restores weights; generating from discarded weights raises.
* ``CPUResourcePoolManager`` replaces the GPU resource pools; ``CPURewardModelManager`` replaces the
  reward-model server (used only for a colocated reward model, whose scores then come from the
  custom reward function, as verl's generative reward models do).
* ``InProcessAgentLoopManager`` runs verl's real ``AgentLoopWorker`` (single-turn agent loop, reward
  loop client, output layout) in the driver process instead of a Ray actor, with a pickle round
  trip on every call as Ray would do.

Everything else is verl's real code: ``RayPPOTrainer.__init__``/``init_workers``/``fit``, the
dataset and dataloader, ``_balance_batch``, the reward loop (``RewardLoopManager`` and its
``RewardLoopWorker`` Ray actors running the configured reward manager), ``CheckpointEngineManager``
(naive backend), ``compute_advantage`` and the registries, ``ppo_loss``, the metrics and the
``Tracking`` file logger.

The worker records what the trainer sent it (``FitRecords``) so tests can recount numbers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import pickle
import threading
from dataclasses import dataclass, field
from functools import partial

import ray
import torch
from transformers import AutoModelForCausalLM

from verl.experimental.agent_loop.agent_loop import AgentLoopManager, AgentLoopWorker
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.torch_functional import entropy_from_logits, get_constant_schedule_with_warmup
from verl.workers.config.optimizer import build_optimizer
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.rollout.replica import TokenOutput
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from grouprl_verl.runner import GroupRLTaskRunner


def _transfer(obj):
    """What a Ray call does to its arguments and results: a serialisation round trip."""
    return pickle.loads(pickle.dumps(obj))


def _run_coroutine(coro):
    """Run ``coro`` to completion from sync code, also when an event loop is already running here."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


# ----------------------------------------------------------------------------- records
@dataclass
class FitRecords:
    """What the trainer sent to the worker (after the transfer), for the tests' naive recounts."""

    log_prob_calls: list[dict] = field(default_factory=list)  # one per compute_log_prob
    updates: list[dict] = field(default_factory=list)  # one per update_actor: the whole batch
    micro_losses: list[dict] = field(default_factory=list)  # one per loss_fn call
    weight_syncs: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (global_steps, flat weights)
    optimizer_steps: int = 0


# ----------------------------------------------------------------------------- model helpers
def _padded(nested: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = list(nested.unbind())
    width = max(r.numel() for r in rows)
    out = torch.full((len(rows), width), pad, dtype=rows[0].dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
        mask[i, : r.numel()] = 1
    return out, mask


def forward_no_padding(module, data, calculate_entropy: bool) -> dict[str, torch.Tensor]:
    """``log_probs`` (and ``entropy``) in the FSDP engine's layout: nested tensors over the valid tokens of
    each sequence, position t holding log p(token t+1) (mirrors ``FSDPEngineWithLMHead.prepare_model_outputs``)."""
    input_ids, position_ids = data["input_ids"], data["position_ids"]
    offsets = input_ids.offsets()
    ids, mask = _padded(input_ids, 0)
    pos, _ = _padded(position_ids, 0)
    temperature = tu.get(data, "temperature", 1.0)
    temperature = float(temperature) if not isinstance(temperature, torch.Tensor) else temperature.float().view(-1, 1, 1)
    logits = module(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits.float() / temperature
    labels = torch.roll(ids, shifts=-1, dims=1)  # the label of the last valid token is never read
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    valid = mask.bool()
    out = {"log_probs": torch.nested.nested_tensor_from_jagged(log_probs[valid], offsets)}
    if calculate_entropy:
        out["entropy"] = torch.nested.nested_tensor_from_jagged(entropy_from_logits(logits)[valid], offsets)
    return out


def flat_weights(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


# ----------------------------------------------------------------------------- vLLM stand-in
class CPUHybridRollout:
    """The rollout engine inside the actor worker (hybrid mode), with vLLM's level-2 sleep semantics."""

    def __init__(self, model_path: str, response_length: int, eos_token_id: int):
        self.model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32).eval()
        self.response_length = response_length
        self.eos_token_id = eos_token_id
        self.awake = True
        self.weights_loaded = False  # verl starts vLLM with dummy weights and syncs them before use
        self.version: int | None = None
        self._ordinal: dict[tuple, int] = {}
        self.events: list[tuple] = []  # ("sleep"|"wake_up"|"resume"|"update_weights"|"generate", detail)

    # engine_workers.ActorRolloutRefWorker.update_weights drives these three (naive backend)
    async def resume(self, tags: list[str]):
        self.events.append(("resume", tuple(tags)))
        if "kv_cache" in tags:
            self.awake = True

    async def update_weights(self, weights, global_steps: int | None = None, **kwargs):
        self.model.load_state_dict(dict(weights), strict=True)
        self.weights_loaded, self.version = True, global_steps
        self._ordinal.clear()
        self.events.append(("update_weights", global_steps))

    async def release(self):
        self.sleep()

    def sleep(self):
        """vLLM ``sleep(level=2)`` for full-weight training: weights and KV cache are discarded."""
        self.events.append(("sleep", 2))
        self.awake, self.weights_loaded = False, False
        with torch.no_grad():
            for p in self.model.parameters():
                p.fill_(float("nan"))

    def wake_up(self):
        """vLLM ``wake_up``: memory is mapped back; weights discarded by a level-2 sleep stay gone."""
        self.events.append(("wake_up", None))
        self.awake = True

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], sampling_params: dict, row: int = 0) -> TokenOutput:
        if not self.awake:
            raise RuntimeError("rollout stand-in: generate() while the engine sleeps")
        if not self.weights_loaded:
            raise RuntimeError(
                "rollout stand-in: generate() after a level-2 sleep without update_weights(): vLLM discarded the "
                "weights; only the checkpoint manager's update_weights() restores them"
            )
        # the sample depends on the prompt, the weights' version and the row (and how often that row was asked
        # since the weights were synced), not on the order in which the agent loop's tasks call: runs replay
        key = (tuple(prompt_ids), self.version, row)
        ordinal = self._ordinal.get(key, 0)
        self._ordinal[key] = ordinal + 1
        digest = hashlib.md5(repr((key, ordinal)).encode()).hexdigest()
        generator = torch.Generator().manual_seed(int(digest[:12], 16))
        temperature = float(sampling_params.get("temperature", 1.0))
        ids = torch.tensor([prompt_ids])
        out = self.model(input_ids=ids, use_cache=True)
        tokens, log_probs = [], []
        for _ in range(self.response_length):
            logits = out.logits[0, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
                log_probs.append(float(torch.log(probs[token])))
            else:
                token = int(logits.argmax())
                log_probs.append(float(torch.log_softmax(logits, -1)[token]))
            tokens.append(token)
            if token == self.eos_token_id:
                break
            out = self.model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        self.events.append(("generate", self.version))
        return TokenOutput(token_ids=tokens, log_probs=log_probs if sampling_params.get("logprobs") else None,
                           stop_reason="completed", num_preempted=0, extra_fields={"global_steps": self.version})


class CPUReplica:
    """``RolloutReplica`` (vLLMReplica in hybrid mode) over the worker's rollout."""

    def __init__(self, rollout: CPUHybridRollout):
        self.rollout = rollout
        self.workers = []

    async def sleep(self):
        self.rollout.sleep()

    async def wake_up(self):
        self.rollout.wake_up()

    async def abort_all_requests(self, reject_request: bool = False):
        return {"aborted_count": 0, "request_ids": []}

    async def resume_generation(self):
        return None

    async def release_kv_cache(self):
        return None

    async def resume_kv_cache(self):
        return None

    async def clear_kv_cache(self):
        return None

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self):
        return None


class CPULLMClient:
    """``LLMServerClient.generate`` (llm_server.py) against the in-process rollout."""

    def __init__(self, rollout: CPUHybridRollout):
        self.rollout = rollout

    async def generate(self, request_id, *, prompt_ids, sampling_params, image_data=None, video_data=None,
                       audio_data=None, mm_processor_kwargs=None, **kwargs) -> TokenOutput:
        if image_data or video_data or audio_data:
            raise NotImplementedError("rollout stand-in: text only")
        # the agent loop passes each row's index in the batch as its vLLM priority
        output = self.rollout.generate(list(prompt_ids), dict(sampling_params), row=int(kwargs.get("priority", 0)))
        steps = output.extra_fields.get("global_steps")
        output.extra_fields.setdefault("min_global_steps", steps)
        output.extra_fields.setdefault("max_global_steps", steps)
        return output


class CPULLMServerManager:
    """``LLMServerManager`` (llm_server.py): one hybrid replica living in the actor worker."""

    def __init__(self, config, worker_group=None, rollout_resource_pool=None, **kwargs):
        self.config = config
        self.rollout = worker_group.worker.rollout
        self.rollout_replicas = [CPUReplica(self.rollout)]

    @classmethod
    def create(cls, *args, **kwargs):
        return cls(*args, **kwargs)

    def get_client(self, client_cls=None, **kwargs):
        return CPULLMClient(self.rollout)

    def get_replicas(self):
        return self.rollout_replicas

    def start_profile(self, **kwargs):
        return None

    def stop_profile(self):
        return None


class CPURewardModelManager:
    """``RewardModelManager`` (reward_loop/reward_model.py) without a server: the custom reward function scores."""

    def __init__(self, config, resource_pool=None):
        self.config = config
        self.wake_ups = 0

    def get_router_address(self):
        return None

    def wake_up(self):
        self.wake_ups += 1

    def sleep(self):
        return None


# ----------------------------------------------------------------------------- agent loop in process
class _LocalMethod:
    def __init__(self, target, name):
        self.target, self.name = target, name

    def remote(self, *args, **kwargs):
        method = getattr(self.target, self.name)
        args, kwargs = _transfer((args, kwargs))

        async def call():
            result = method(*args, **kwargs)
            if asyncio.iscoroutine(result):
                result = await result
            return _transfer(result)

        return call()


class _LocalActor:
    """A Ray actor handle's ``method.remote(...)`` for an object in this process."""

    def __init__(self, target):
        self.target = target

    def __getattr__(self, name):
        return _LocalMethod(self.target, name)


class InProcessAgentLoopManager(AgentLoopManager):
    """verl's ``AgentLoopManager`` whose ``AgentLoopWorker``s run in this process (the LLM client they call
    is the in-process rollout stand-in, which a Ray actor could not reach)."""

    async def _init_agent_loop_workers(self):
        self.agent_loop_workers = []
        for _ in range(self.rollout_config.agent.num_workers):
            worker = AgentLoopWorker(self.config, self.llm_client, self.teacher_client, self.reward_loop_worker_handles)
            # the toy tokenizer is character level, without the ChatML tokens verl's Qwen token builder
            # expects for model_type "qwen2": use verl's generic builder (what an unknown model_type gets)
            worker.hf_model_type = None
            self.agent_loop_workers.append(_LocalActor(worker))
        self.generations: list[tuple[int, list[str]]] = []  # (global_steps, uids) per generate_sequences call

    def generate_sequences(self, prompts):
        self.generations.append((prompts.meta_info.get("global_steps"), sorted(set(map(str, prompts.non_tensor_batch["uid"])))))
        return super().generate_sequences(prompts)


# ----------------------------------------------------------------------------- worker + worker group
class CPUActorRolloutRefWorker(Worker):
    """``ActorRolloutRefWorker`` (engine_workers.py) on the tiny HF model: actor, optional ref, hybrid rollout."""

    def __init__(self, config, role: str, distillation_config=None, **kwargs):
        Worker.__init__(self)
        self.config, self.role = config, role
        self.records = FitRecords()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        path = self.config.model.path
        self.actor_config = omega_conf_to_dataclass(self.config.actor)
        self.actor = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        self.optimizer = build_optimizer(self.actor.parameters(), self.actor_config.optim)
        self.lr_scheduler = get_constant_schedule_with_warmup(self.optimizer, num_warmup_steps=0)
        self.loss_fn = partial(ppo_loss, config=self.actor_config)  # engine_workers.py:643
        self.ref = None
        if "ref" in self.role:
            self.ref = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        tokenizer_eos = self.actor.generation_config.eos_token_id
        self.rollout = CPUHybridRollout(path, self.config.rollout.response_length, tokenizer_eos)
        self._register_dispatch_collect_info("actor", dp_rank=0, is_collect=True)
        self._register_dispatch_collect_info("ref", dp_rank=0, is_collect=True)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def set_loss_fn(self, loss_fn):
        self.loss_fn = loss_fn

    def _infer(self, module, data):
        calculate_entropy = bool(tu.get(data, "calculate_entropy", False))
        with torch.no_grad():
            output = forward_no_padding(module, data, calculate_entropy)
        tokens = tu.get(data, "global_token_num", None)  # the MFU estimate of TrainingWorker.infer_batch
        self.records.log_prob_calls.append({
            "global_token_num": None if tokens is None else list(tokens),
            "seq_lens": data["input_ids"].offsets().diff().tolist(),
            "input_ids": [r.tolist() for r in data["input_ids"].unbind()],
            "calculate_entropy": calculate_entropy,
        })
        metrics = {"mfu": 0.0 if tokens is None else float(sum(tokens)) * 1e-9}
        return tu.get_tensordict(tensor_dict=output, non_tensor_dict={"metrics": metrics})

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def compute_log_prob(self, data):
        return self._infer(self.actor, data)

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def compute_ref_log_prob(self, data):
        return self._infer(self.ref if self.ref is not None else self.actor, data)

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def update_actor(self, data):
        """``TrainingWorker.train_mini_batch`` + ``FSDPEngine.train_batch`` (engine_workers.py, transformer_impl.py)."""
        mini_batch_size = tu.pop(data, "mini_batch_size")
        epochs = tu.pop(data, "epochs", 1)
        seed = tu.pop(data, "seed", 42)
        dataloader_kwargs = tu.pop(data, "dataloader_kwargs", {})
        calculate_entropy = bool(tu.get(data, "calculate_entropy", False))
        self.records.updates.append(_batch_record(data))
        metrics: dict[str, list] = {}
        self.actor.train()
        for mini_batch in tu.make_iterator(data, mini_batch_size=mini_batch_size, epochs=epochs, seed=seed,
                                           dataloader_kwargs=dataloader_kwargs):
            self.optimizer.zero_grad()
            tu.assign_non_tensor(mini_batch, batch_num_tokens=int(mini_batch["loss_mask"].sum()), dp_size=1,
                                 use_dynamic_bsz=False,
                                 micro_batch_size_per_gpu=self.config.actor.ppo_micro_batch_size_per_gpu)
            micro_batches, _ = prepare_micro_batches(mini_batch)
            step_metrics: dict = {}
            for micro in micro_batches:
                output = forward_no_padding(self.actor, micro, calculate_entropy)
                loss, loss_metrics = self.loss_fn(model_output=output, data=micro, dp_group=None)
                loss.backward()
                self.records.micro_losses.append(_micro_record(micro, output, loss, len(self.records.updates) - 1))
                for key, value in loss_metrics.items():
                    if hasattr(value, "extend") and key in step_metrics:
                        step_metrics[key].extend(value)
                    else:
                        step_metrics.setdefault(key, value)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.actor.parameters(), self.actor_config.optim.clip_grad)
            self.optimizer.step()
            self.records.optimizer_steps += 1
            self.lr_scheduler.step()
            for key, value in step_metrics.items():
                metrics.setdefault(key, []).append(value.aggregate() if hasattr(value, "aggregate") else value)
            metrics.setdefault("grad_norm", []).append(float(grad_norm))
            metrics.setdefault("lr", []).append(self.lr_scheduler.get_last_lr()[0])
        metrics["mfu"] = [0.0]
        self.actor.eval()
        return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": metrics})

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        os.makedirs(local_path, exist_ok=True)
        torch.save({"model": self.actor.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.lr_scheduler.state_dict()}, os.path.join(local_path, "cpu_actor.pt"))

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        state = torch.load(os.path.join(local_path, "cpu_actor.pt"), weights_only=False)
        self.actor.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    async def update_weights(self, global_steps: int | None = None, mode: str = "auto"):
        """The naive (colocated) path of ``ActorRolloutRefWorker.update_weights``: resume weights, load, resume KV."""
        await self.rollout.resume(tags=["weights"])
        params = ((name, tensor.detach().clone()) for name, tensor in self.actor.state_dict().items())
        await self.rollout.update_weights(params, global_steps=global_steps)
        await self.rollout.resume(tags=["kv_cache"])
        self.records.weight_syncs.append((global_steps, flat_weights(self.actor)))


def _batch_record(data) -> dict:
    record = {}
    for key in ("responses", "response_mask", "advantages", "token_level_scores", "token_level_rewards",
                "old_log_probs", "rollout_log_probs", "prompts", "grouprl_copo_local", "grouprl_copo_global",
                "grouprl_copo_weight", "rm_scores"):
        if key in data.keys():
            record[key] = data[key].clone()
    for key in data.keys():
        if key not in record and isinstance(key, str) and not isinstance(data.get(key), torch.Tensor):
            try:
                record[key] = tu.get(data, key)
            except Exception:  # noqa: BLE001 - a record, not a check
                pass
    return record


def _micro_record(micro, output, loss, update_index) -> dict:
    fields = ["response_mask", "old_log_probs", "advantages"] + [k for k in micro.keys() if str(k).startswith("grouprl_")]
    padded = micro.select(*fields).to_padded_tensor()
    return {
        "update": update_index,
        "loss": float(loss.detach()),
        "log_probs": no_padding_2_padding(output["log_probs"], micro).detach(),
        "fields": {k: padded[k].clone() for k in fields},
        "global_batch_size": tu.get(micro, "global_batch_size"),
        "batch_num_tokens": tu.get(micro, "batch_num_tokens"),
    }


class _RoleGroup:
    """One role's view of the worker group: calls go to the worker after a transfer round trip."""

    world_size = 1

    def __init__(self, worker: CPUActorRolloutRefWorker):
        self.worker = worker
        self._dispatch_info = {}

    def _query_dispatch_info(self, mesh_name):
        return [self.worker._query_dispatch_info(mesh_name)]

    def __getattr__(self, name):
        method = getattr(self.worker, name)
        if name == "update_weights":  # blocking=False: verl's CheckpointEngineManager ray.get()s the refs
            return lambda *a, **k: [ray.put(_run_coroutine(method(*a, **k)))]

        def call(*args, **kwargs):
            args, kwargs = _transfer((args, kwargs))
            return _transfer(method(*args, **kwargs))

        return call


class InProcessWorkerGroup:
    """``RayWorkerGroup`` with one worker (world size 1) in this process; ``spawn`` gives per-role views."""

    _env_lock = threading.Lock()

    def __init__(self, resource_pool=None, ray_cls_with_init=None, **kwargs):
        worker_dict_cls = ray_cls_with_init.cls.__ray_actor_class__  # verl's colocated WorkerDict
        env = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599"}
        with self._env_lock:
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                self.worker_dict = worker_dict_cls(*ray_cls_with_init.args, **ray_cls_with_init.kwargs)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

    def spawn(self, prefix_set):
        return {prefix: _RoleGroup(self.worker_dict.worker_dict[prefix]) for prefix in prefix_set}


class CPUResourcePool:
    def __init__(self, name: str):
        self.name, self.world_size, self.store = name, 1, [1]


class CPUResourcePoolManager:
    """``ResourcePoolManager`` (single_controller/ray/base.py) without GPUs."""

    def __init__(self, resource_pool_spec: dict, mapping: dict):
        self.resource_pool_spec, self.mapping = resource_pool_spec, mapping
        self.resource_pool_dict = {}

    def create_resource_pool(self):
        self.resource_pool_dict = {name: CPUResourcePool(name) for name in self.resource_pool_spec}

    def get_resource_pool(self, role):
        return self.resource_pool_dict[self.mapping[role]]

    def get_n_gpus(self) -> int:
        return 1


class CPUTaskRunner(GroupRLTaskRunner):
    """grouprl's task runner (the launcher's own ``run``) with the CPU worker group and resource pools."""

    def add_actor_rollout_worker(self, config):
        super().add_actor_rollout_worker(config)
        for role in self.role_worker_mapping:
            self.role_worker_mapping[role] = ray.remote(CPUActorRolloutRefWorker)
        return CPUActorRolloutRefWorker, InProcessWorkerGroup

    def init_resource_pool_mgr(self, config):
        manager = super().init_resource_pool_mgr(config)
        return CPUResourcePoolManager(manager.resource_pool_spec, manager.mapping)


def _wait_until_released(name: str, attempts: int = 300) -> None:
    import time

    for _ in range(attempts):
        try:
            ray.get_actor(name)
        except ValueError:
            return
        time.sleep(0.1)
    raise RuntimeError(f"Ray actor {name!r} is still registered after ray.kill")


def uid_groups(uids) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(uids):
        groups.setdefault(str(u), []).append(i)
    return groups



# ----------------------------------------------------------------------------- running a fit
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(os.path.dirname(TESTS_DIR), "grouprl_verl", "configs")


def two_digit_answer(a: int, b: int) -> str:
    return str((7 * (a + b) + 3) % 90 + 10)


def write_fit_data(directory: str, num_rows: int = 24) -> str:
    """A verl-format parquet of short prompts ("q37:") with two-digit answers and a reference solution."""
    import pandas as pd

    rows = []
    for i in range(num_rows):
        a, b = i % 10, (3 * i + 1) % 10
        answer = two_digit_answer(a, b)
        rows.append({
            "data_source": "grouprl_toy",
            "prompt": [{"role": "user", "content": f"q{a}{b}:"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"index": i, "split": "train", "solution": answer},
        })
    path = os.path.join(directory, "train.parquet")
    pd.DataFrame(rows).to_parquet(path)
    return path


def fit_overrides(model_dir: str, parquet: str, work_dir: str, reward_name: str, steps: int) -> list[str]:
    """Tiny sizes; the CPU stand-ins through verl's own extension points (agent-loop manager class)."""
    return [
        f"data.train_files={parquet}", f"data.val_files={parquet}",
        "data.train_batch_size=4", "data.max_prompt_length=8", "data.max_response_length=12",
        "data.filter_overlong_prompts=false", "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "+actor_rollout_ref.rollout.agent.agent_loop_manager_class=verl_fit_standins.InProcessAgentLoopManager",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.optim.lr=0.01",
        "reward.num_workers=1",
        f"reward.custom_reward_function.path={os.path.join(TESTS_DIR, 'verl_fit_rewards.py')}",
        f"reward.custom_reward_function.name={reward_name}",
        "trainer.n_gpus_per_node=1", "trainer.nnodes=1", "trainer.logger=[file]",
        f"trainer.total_training_steps={steps}", "trainer.total_epochs=100",
        "trainer.save_freq=-1", "trainer.test_freq=-1", "trainer.val_before_train=false",
        f"trainer.default_local_dir={os.path.join(work_dir, 'ckpt')}",
        "trainer.project_name=grouprl_fit", f"trainer.experiment_name={reward_name}",
    ]


def compose(config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides)


@dataclass
class FitRun:
    trainer: object
    records: FitRecords
    metrics: list[dict]  # the Tracking file logger's lines: {"step": s, "data": {...}}
    rollout: CPUHybridRollout
    log: list[str] = field(default_factory=list)  # grouprl_verl.trainer's log records (INFO and up) of the run

    def step_metrics(self, step: int) -> dict:
        (line,) = [m for m in self.metrics if m["step"] == step]
        return line["data"]


def run_fit(config, work_dir: str) -> FitRun:
    """``GroupRLTaskRunner.run`` (the launcher's code) on CPU: verl's real ``fit`` with the stand-ins above."""
    import json

    from verl.experimental.reward_loop import reward_loop
    from verl.trainer.ppo import ray_trainer

    metrics_path = os.path.join(work_dir, f"metrics_{len(os.listdir(work_dir))}.jsonl")
    saved = ray_trainer.LLMServerManager, os.environ.get("VERL_FILE_LOGGER_PATH"), reward_loop.RewardModelManager
    # the GPU servers: vLLM for the policy, and (only with reward.reward_model.enable) the reward model's
    ray_trainer.LLMServerManager = CPULLMServerManager
    reward_loop.RewardModelManager = CPURewardModelManager
    os.environ["VERL_FILE_LOGGER_PATH"] = metrics_path
    runner = CPUTaskRunner()
    try:
        runner.run(config)
    finally:
        ray_trainer.LLMServerManager = saved[0]
        reward_loop.RewardModelManager = saved[2]
        if saved[1] is None:
            os.environ.pop("VERL_FILE_LOGGER_PATH", None)
        else:
            os.environ["VERL_FILE_LOGGER_PATH"] = saved[1]
        trainer = runner.trainer
        manager = getattr(trainer, "reward_loop_manager", None) if trainer is not None else None
        for i, handle in enumerate(getattr(manager, "reward_loop_workers", [])):
            ray.kill(handle)  # named actors (reward_loop_worker_<i>): the next run creates them again
            _wait_until_released(f"reward_loop_worker_{i}")
    with open(metrics_path) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    worker = trainer.actor_rollout_wg.worker
    return FitRun(trainer=trainer, records=worker.records, metrics=metrics, rollout=worker.rollout)
