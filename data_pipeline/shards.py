"""WebDataset token shards: the format and indexes (shard_format), the writer (shard_writer) and
the readers (shard_reader), gathered under one name."""

from .shard_format import *  # noqa: F401,F403
from .shard_format import (  # noqa: F401 - private names used by tests and tools
    _BLOCK,
    _ZERO_BLOCK,
    _UINT16_LIMIT,
    _INT32_LIMIT,
    _REGULAR_TYPES,
    _check_version,
    _dataset_urls,
    _encode_npy,
    _make_entry,
    _tarinfo,
)
from .shard_reader import *  # noqa: F401,F403
from .shard_reader import (  # noqa: F401
    _Member,
    _Group,
    _Reader,
    _padded,
    _parse_pax,
    _iter_members,
    _iter_groups,
    _NPY_LOCK,
    _decode_sample,
    _fs_reason,
    _open_shard,
    _check_sample_codec,
    _entry_from_sample,
)
from .shard_writer import *  # noqa: F401,F403
from .shard_writer import (  # noqa: F401
    _HashingWriter,
)
