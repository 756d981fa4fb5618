"""Agent environments over the slot pool.

- `agent_loop`: one trajectory (model turns, tool calls in a slot, scoring by hidden checks);
- `task_set` and `tasks/builtin.jsonl`: the tasks; `reference_policy`: replays their solutions;
- `agent_env`: the Atropos environment (`AgentEnv`), the one module that needs atroposlib.
"""
