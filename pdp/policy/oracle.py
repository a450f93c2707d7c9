"""Casbin, loaded from the model and policy files, as the reference decision maker.

Casbin's deny-override effect reports the deciding rule only for denials, so a
second enforcer over the same files with an allow-override effect names the
first applicable allow. Together they give the decision and deciding rule that
``pdp.core.engine.decide`` must reproduce.
"""

from __future__ import annotations

import casbin
from casbin.persist.adapters import FileAdapter

from pdp.core.engine import Decision, decision_for, topic_applies
from pdp.registry.file import Device

FIRST_ALLOW_EFFECT = "some(where (p.eft == allow))"


def _topic_match(action: str, topic: str, pattern: str, device: Device) -> bool:
    return topic_applies(action, topic, pattern, device.attributes())


class CasbinReference:
    def __init__(self, model_path: str, policy_path: str) -> None:
        self._model_path = model_path
        self._policy_path = policy_path
        self.enforcer = casbin.Enforcer(model_path, policy_path)
        self.enforcer.add_function("topicMatch", _topic_match)
        self._first_allow_enforcer: casbin.Enforcer | None = None

    @property
    def _first_allow(self) -> casbin.Enforcer:
        """Built on first use: only explanations and verification need the allowing rule's id."""
        if self._first_allow_enforcer is None:
            allow_model = casbin.Enforcer.new_model(self._model_path)
            allow_model.add_def("e", "e", FIRST_ALLOW_EFFECT)
            enforcer = casbin.Enforcer(allow_model, FileAdapter(self._policy_path))
            enforcer.add_function("topicMatch", _topic_match)
            self._first_allow_enforcer = enforcer
        return self._first_allow_enforcer

    def policy_lines(self) -> list[list[str]]:
        return [list(rule) for rule in self.enforcer.get_policy()]

    def decide(self, device: Device, action: str, topic: str) -> Decision:
        allowed, explain = self.enforcer.enforce_ex(device, topic, action)
        if not allowed:
            return decision_for(False, explain[0] if explain else None)
        _, allow_explain = self._first_allow.enforce_ex(device, topic, action)
        return decision_for(True, allow_explain[0])
