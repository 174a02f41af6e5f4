"""StageSpec: what one stage computes for one artifact (its params), from which artifacts (upstream), with which
model (how to load it: not in the key) and how to run it (device etc.: not in the key).

A spec's key is the sha256 of (stage, the stage's version, params, upstream keys), so identical prompts share one
text artifact across rows and batches, and changing a seed re-runs only denoise and decode. Specs travel as JSON
(a Luigi task parameter, a rank group's command), so they hold only plain values.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .stages.registry import stage_of
from .store import ArtifactRef, cache_key


@dataclass
class StageSpec:
    stage: str  # a registry name: text | image | denoise-high | denoise-low | denoise-single | decode
    params: dict[str, Any]
    upstream: dict[str, "StageSpec"] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)  # ModelRef fields + component: how to load, not in key
    runtime: dict[str, Any] = field(default_factory=dict)  # device etc.: how to run, not in key

    @property
    def family(self) -> str:
        return stage_of(self.stage).family

    @cached_property
    def key(self) -> str:
        return cache_key(self.stage, stage_of(self.stage).version, self.params,
                         {name: spec.key for name, spec in sorted(self.upstream.items())})

    @property
    def ref(self) -> ArtifactRef:
        return ArtifactRef(self.stage, self.key, stage_of(self.stage).ext)

    @property
    def fingerprint(self) -> str | None:
        """The fingerprint of the model this stage runs (the params entry its registry entry names)."""
        return self.params.get(stage_of(self.stage).fingerprint_param)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "params": self.params, "model": self.model, "runtime": self.runtime,
                "upstream": {k: v.to_dict() for k, v in self.upstream.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageSpec":
        return cls(stage=d["stage"], params=d["params"], model=d["model"], runtime=d["runtime"],
                   upstream={k: cls.from_dict(v) for k, v in d["upstream"].items()})

    @classmethod
    def from_json(cls, text: str) -> "StageSpec":
        return cls.from_dict(json.loads(text))

    def chain(self) -> list["StageSpec"]:
        """This spec and everything upstream, each once, upstream first."""
        seen: dict[str, StageSpec] = {}

        def visit(spec: StageSpec) -> None:
            for up in spec.upstream.values():
                visit(up)
            seen.setdefault(spec.key, spec)

        visit(self)
        return list(seen.values())
