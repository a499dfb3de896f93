"""Save inversions and null-text embeddings to .safetensors and load them back, checked against the model and
latent they meet."""

from __future__ import annotations

from ..inversion.record import FORMAT, NULL_TEXT_FORMAT, Inversion, NullText
from ._api import RetraceNode, io
from ._host import Inversion as InversionType, NullTextType
from ._records import file_exists, load_record, load_schema, save_record, save_schema


class RetraceSaveInversion(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        record = InversionType.Input("inversion", tooltip="From Retrace Invert: noise, trajectory and schedule.")
        return save_schema(record, "inversion", node_id="RetraceSaveInversion",
                           display_name="Retrace Save Inversion", category="Retrace/inversion",
                           description="Save an inversion (noise, trajectory, sigmas, model family and shapes) to "
                                       "output/retrace/ as .safetensors. Never overwrites a file.")

    @classmethod
    def execute(cls, inversion: Inversion, filename_prefix: str) -> io.NodeOutput:
        return save_record(inversion, filename_prefix)


class RetraceLoadInversion(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        output = InversionType.Output(tooltip="The saved inversion, checked against the model; connect to Sample "
                                              "Inversion, the guiders or Null-Text Inversion.")
        return load_schema("inversion_file", FORMAT, "inversion", output, node_id="RetraceLoadInversion",
                           display_name="Retrace Load Inversion", category="Retrace/inversion",
                           description="Load a saved inversion and check that it fits the model (and latent, if "
                                       "given); a mismatch is named before anything runs.")

    @classmethod
    def validate_inputs(cls, inversion_file: str) -> bool | str:
        return file_exists(inversion_file)

    @classmethod
    def execute(cls, inversion_file: str, model, latent: dict | None = None) -> io.NodeOutput:
        return load_record(Inversion, inversion_file, model, latent, "inversion file")


class RetraceSaveNullText(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        record = NullTextType.Input("null_text", tooltip="From Retrace Null-Text Inversion (or Load Null-Text).")
        return save_schema(record, "null_text", node_id="RetraceSaveNullText",
                           display_name="Retrace Save Null-Text", category="Retrace/inversion/guidance",
                           description="Save null-text embeddings (with their schedule, model and guidance) to "
                                       "output/retrace/ as .safetensors. Never overwrites a file.")

    @classmethod
    def execute(cls, null_text: NullText, filename_prefix: str) -> io.NodeOutput:
        return save_record(null_text, filename_prefix)


class RetraceLoadNullText(RetraceNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        output = NullTextType.Output(tooltip="The saved per-step embeddings, checked against the model; connect "
                                             "to Retrace Null-Text Guider.")
        return load_schema("null_text_file", NULL_TEXT_FORMAT, "null-text", output, node_id="RetraceLoadNullText",
                           display_name="Retrace Load Null-Text", category="Retrace/inversion/guidance",
                           description="Load saved null-text embeddings and check that they fit the model (and "
                                       "latent, if given).")

    @classmethod
    def validate_inputs(cls, null_text_file: str) -> bool | str:
        return file_exists(null_text_file)

    @classmethod
    def execute(cls, null_text_file: str, model, latent: dict | None = None) -> io.NodeOutput:
        return load_record(NullText, null_text_file, model, latent, "null-text file")


NODES = [RetraceSaveInversion, RetraceLoadInversion, RetraceSaveNullText, RetraceLoadNullText]
