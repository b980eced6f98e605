"""The authors' reference checkpoint layout, both ways.

    names    the name table (dyntrain <-> reference) and the reference's unused parameters
    convert  strict, exact state_dict conversion; the architecture read off a reference file's shapes
    files    reference files (Lightning or bare) read and written; ``read_weights`` for entry points

``python launch/convert.py --from reference IN --out weights.safetensors`` and ``--to reference``.
"""
from dyntrain.interop.convert import (Imported, ReferenceFormatError, from_reference, infer_config,
                                      looks_like_reference, strip_prefixes, to_reference)
from dyntrain.interop.files import export_reference, import_reference, read_reference, read_weights, write_reference
from dyntrain.interop.names import architecture_differences, name_table, reference_name, unused_shapes


__all__ = [
    "Imported", "ReferenceFormatError", "architecture_differences", "export_reference", "from_reference",
    "import_reference", "infer_config", "looks_like_reference", "name_table",
    "read_reference", "read_weights", "reference_name", "strip_prefixes", "to_reference", "unused_shapes",
    "write_reference",
]
