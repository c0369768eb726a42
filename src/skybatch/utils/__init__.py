"""Sky Batch's ``sky.batch.utils`` storage helpers, for custom formats ported by the
rename rule (``from skybatch import utils``); ``registry`` is ``sky.utils.registry``.

The helpers take any URL skybatch's storage takes (``s3://``, ``gs://``, a local
path, ...), not only ``s3://`` and ``gs://``.
"""

from __future__ import annotations

from skybatch.utils.cloud import (
    BATCH_NAME_PATTERN,
    INPUT_BATCH_NAME_PATTERN,
    TEMP_DIR_NAME,
    cloud_path_exists,
    concatenate_batches_to_output,
    delete_batch_files,
    delete_input_batch_files,
    download_file_from_cloud,
    download_from_cloud,
    get_batch_path,
    get_input_batch_path,
    list_batch_files,
    load_jsonl_from_cloud,
    save_jsonl_to_cloud,
    upload_bytes_to_cloud,
    upload_file_to_cloud,
)

__all__ = [
    "BATCH_NAME_PATTERN",
    "INPUT_BATCH_NAME_PATTERN",
    "TEMP_DIR_NAME",
    "cloud_path_exists",
    "concatenate_batches_to_output",
    "delete_batch_files",
    "delete_input_batch_files",
    "download_file_from_cloud",
    "download_from_cloud",
    "get_batch_path",
    "get_input_batch_path",
    "list_batch_files",
    "load_jsonl_from_cloud",
    "save_jsonl_to_cloud",
    "upload_bytes_to_cloud",
    "upload_file_to_cloud",
]
