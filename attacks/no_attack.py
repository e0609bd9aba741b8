"""The ``none`` attack: the plain prompt, so that ASR equals pre-attack ASR."""

from __future__ import annotations

from benchmark.plugins import AdversarialPrompt, Attack, AttackContext


class NoAttack(Attack):
    """No attack: the plain prompt is the adversarial prompt."""

    name = "none"

    def attack(self, context: AttackContext) -> AdversarialPrompt:
        ids = context.model.tokenize([context.record.prompt]).input_ids[0].tolist()
        return AdversarialPrompt(text=context.record.prompt, token_ids=ids)
