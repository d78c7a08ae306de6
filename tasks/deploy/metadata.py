"""What an export carries beside its network, as one typed record: ``ExportMetadata``.

Every task describes its export with ``BaseTask.export_record()`` and serves one through
``BaseTask.adopt_export(path, record, network)``; the record is written as ONNX metadata properties (and as
the JSON extra file of TorchScript archives) by ``to_properties()`` and read back by ``from_properties()``.

One format for every list: names (classes, attributes) as a JSON list of strings, so that a name may hold
a comma; numbers (mean, std, category ids) comma-separated. Name lists written comma-separated by exports
made before this record (SSD class names, attribute names) are still read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mobilenets.tasks.deploy.export import format_name_list, parse_floats, parse_name_list
from mobilenets.tasks.deploy.onnx_network import ExportMismatchError

#: The keys the record reads itself; every other key is a task-specific property.
RECORD_KEYS = (
    "task",
    "input_size",
    "mean",
    "std",
    "num_classes",
    "class_names",
    "attributes",
    "category_ids",
)
#: Older exports named the attribute list ``attribute_names``.
LEGACY_KEYS = {"attribute_names": "attributes"}


def _format_numbers(values: Sequence[Any]) -> str:
    return ",".join(map(str, values))


@dataclass(frozen=True)
class ExportMetadata:
    """The metadata of an exported task network.

    Args:
        task: the task class name (an export serves only its own task).
        input_size: the square input resolution.
        mean, std: the input normalisation.
        num_classes: classifier outputs (classification).
        class_names: names by class index (classification; detection without the background).
        attribute_names: names by output (attributes; written under the key ``attributes``).
        category_ids: the dataset's category id of each detection label 1..K.
        properties: everything else the task needs beside the network, as text (embedding size,
            threshold, cell table, post-processing settings, what the outputs are, ...).
    """

    task: str
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    attribute_names: tuple[str, ...] | None = None
    category_ids: tuple[int, ...] | None = None
    properties: Mapping[str, str] = field(default_factory=dict)

    def with_properties(self, **properties: str) -> ExportMetadata:
        """A copy with ``properties`` added (or replaced)."""
        return replace(self, properties={**self.properties, **properties})

    def to_properties(self) -> dict[str, str]:
        """The ``dict[str, str]`` written into the exported file."""
        written: dict[str, str] = {
            "task": self.task,
            "input_size": str(int(self.input_size)),
            "mean": _format_numbers(self.mean),
            "std": _format_numbers(self.std),
        }
        if self.num_classes is not None:
            written["num_classes"] = str(int(self.num_classes))
        if self.class_names is not None:
            written["class_names"] = format_name_list(self.class_names)
        if self.attribute_names is not None:
            written["attributes"] = format_name_list(self.attribute_names)
        if self.category_ids is not None:
            written["category_ids"] = _format_numbers(self.category_ids)
        clashes = sorted(set(self.properties) & {*RECORD_KEYS, *LEGACY_KEYS})
        if clashes:
            raise ValueError(f"export properties {clashes} are record fields: set them as fields")
        written.update(self.properties)
        return written

    @classmethod
    def from_properties(cls, properties: Mapping[str, str], path: str | Path = "export") -> ExportMetadata:
        """The record of an exported file's metadata; ``ExportMismatchError`` naming ``path`` and the key
        when a key is missing or unreadable."""
        properties = {LEGACY_KEYS.get(key, key): value for key, value in properties.items()}

        def read(key: str, parse: Any, expected: str) -> Any:
            try:
                return parse(properties[key])
            except KeyError:
                raise ExportMismatchError(
                    f"{path}: metadata key {key!r} is missing; export the model with 'mobilenets export'"
                ) from None
            except Exception as error:
                raise ExportMismatchError(
                    f"{path}: metadata key {key!r}: expected {expected}, got {properties[key]!r}"
                ) from error

        def optional(key: str, parse: Any, expected: str) -> Any:
            return read(key, parse, expected) if properties.get(key, "").strip() else None

        def names(text: str) -> tuple[str, ...]:
            return tuple(parse_name_list(text))

        def integers(text: str) -> tuple[int, ...]:
            return tuple(int(v) for v in parse_name_list(text))

        return cls(
            task=read("task", str, "the task class name"),
            input_size=read("input_size", int, "an integer"),
            mean=read("mean", lambda text: parse_floats(text, "mean"), "comma-separated numbers"),
            std=read("std", lambda text: parse_floats(text, "std"), "comma-separated numbers"),
            num_classes=optional("num_classes", int, "an integer"),
            class_names=optional("class_names", names, "a JSON list of names"),
            attribute_names=optional("attributes", names, "a JSON list of names"),
            category_ids=optional("category_ids", integers, "comma-separated integers"),
            properties={key: value for key, value in properties.items() if key not in RECORD_KEYS},
        )
