"""The recipe's tool agent loop: verl's ``ToolAgentLoop``, recording each trajectory's consistency.

verl 0.9.1 lets a config say which class runs an agent loop name
(``actor_rollout_ref.rollout.agent.agent_loop_config_path``: a list of ``{name, _target_}``, read
by every agent-loop worker); ``config/agent_loop/retool.yaml`` puts this class behind ``tool_agent``,
the name our RL rows carry. The rollout itself is verl's, unchanged: this only looks on. After each
generated turn it notes the turn's tool calls (and any that would not parse or fit the tool's
schema) and whether the loop stopped at the turn or length limit; at the end, for a sample of
trajectories (``retool.consistency.drift_sample`` a step), it checks the rollout's ids against the
chat template's render of the same conversation. The :class:`~recipe.retool.consistency.Record`
rides to the trainer in the trajectory's ``extra_fields``, where the recipe's verl plugin turns a
step's records into metrics (:mod:`recipe.retool.consistency`).
"""

from __future__ import annotations

import random
from typing import Any

from omegaconf import OmegaConf
from verl.experimental.agent_loop.tool_agent_loop import AgentState
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop as VerlToolAgentLoop

from recipe.retool.consistency import (
    CUT_LENGTH,
    CUT_TURNS,
    RECORD_KEY,
    Record,
    drift_rate,
    noncanonical,
    runs,
    token_drift,
    tool_schemas,
    turn_calls,
)

KEPT_PROBLEMS = 3  # problems kept per trajectory, for reading one (the metrics count them all)


class RetoolAgentLoop(VerlToolAgentLoop):
    """verl's tool agent loop (one instance per trajectory), with a :class:`Record` of the trajectory."""

    def __init__(self, *args, **kwargs):
        kwargs.pop("name", None)  # the registry entry's own name, passed on by hydra
        super().__init__(*args, **kwargs)
        sample = OmegaConf.select(self.config, "retool.consistency.drift_sample", default=0) or 0
        self.drift_rate = drift_rate(int(sample), int(self.config.data.train_batch_size), int(self.rollout_config.n))
        # tool calls are read in the hermes format (the template's multi_turn.format); another format's
        # turns are not read, and the invalid-call share leaves them out rather than count them as valid
        self.read_calls = str(self.rollout_config.multi_turn.format) == "hermes"
        self.record = Record(calls_read=self.read_calls)
        self._agent_data = None

    async def run(self, sampling_params: dict[str, Any], **kwargs):
        output = await super().run(sampling_params, **kwargs)
        if self._agent_data is not None and self.drift_rate and random.random() < self.drift_rate:
            await self.loop.run_in_executor(None, self._check_drift, output, len(kwargs["raw_prompt"]))
        output.extra_fields[RECORD_KEY] = self.record.as_dict()
        return output

    async def _handle_pending_state(self, agent_data, sampling_params):
        self._agent_data = agent_data  # verl's run() keeps it local; the drift check needs its messages
        return await super()._handle_pending_state(agent_data, sampling_params)

    async def _handle_generating_state(self, agent_data, sampling_params, ignore_termination: bool = False):
        state = await super()._handle_generating_state(agent_data, sampling_params, ignore_termination)
        self._note_turn(agent_data, state)
        return state

    async def _handle_processing_tools_state(self, agent_data):
        self.record.tool_calls += len(agent_data.tool_calls[: self.max_parallel_calls])
        state = await super()._handle_processing_tools_state(agent_data)
        if state == AgentState.TERMINATED:  # verl stops here only when the tool output would not fit
            self.record.cut = CUT_LENGTH
        return state

    def _note_turn(self, agent_data, state) -> None:
        """The turn just generated: its tool calls, and whether a limit (not the model) ended the trajectory."""
        ids = list(agent_data.response_ids)
        finished = bool(ids) and ids[-1] in set(self.tokenizer.all_special_ids)  # ended on its end-of-turn token
        schemas = tool_schemas(getattr(agent_data, "_active_tool_schemas", self.tool_schemas))
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        blocks, problems = turn_calls(text, schemas, finished=finished) if self.read_calls else (0, [])
        self.record.assistant_turns += 1
        if problems:
            self.record.invalid_turns += 1
            self.record.problems = (self.record.problems + problems)[:KEPT_PROBLEMS]
        if state != AgentState.TERMINATED:
            return
        if len(agent_data.response_mask) >= self.response_length:
            self.record.cut = CUT_LENGTH
        elif blocks > len(problems):  # a call to run, but no turn left for it
            self.record.cut = CUT_TURNS

    def _check_drift(self, output, prompt_messages: int) -> None:
        data = self._agent_data
        drift = token_drift(self.tokenizer, data.messages, prompt_messages, output.prompt_ids, output.response_ids,
                            output.response_mask, tools=getattr(data, "_active_tool_schemas", self.tool_schemas),
                            template_kwargs=self.apply_chat_template_kwargs)
        ids = [*output.prompt_ids, *output.response_ids]
        generated = [ids[s:e] for kind, s, e in runs(len(output.prompt_ids), output.response_mask) if kind == "generated"]
        self.record.drift_checked = True
        self.record.drift = drift.__dict__.copy() if drift else None
        self.record.noncanonical = noncanonical(self.tokenizer, generated)
