"""The tick ring carried across hosts on NATS JetStream (issue #16).

``pipeline bridge publish`` reads a ring and publishes its records, raw, batched per subject, to a
JetStream stream; ``pipeline bridge mirror`` on another host writes the stream's records into a
local ring of the same dtype and symbols, so remote consumers use the same ``RingReader``.

Why JetStream and not a protocol of our own: it is a replicated, replayable log with
de-duplication by message id, already operated and tested; what is ours is only the mapping of
ring records onto it. One module per job: :mod:`.wire` (sans-I/O: subjects, headers, the layout
hash, the stream's meta records), :mod:`.batcher` (sans-I/O: records -> per-subject batches,
resume and gap bookkeeping), :mod:`.mirror_state` (sans-I/O: the mirror's saved position),
:mod:`.publish` and :mod:`.mirror` (the asyncio shells), :mod:`.nats_io` (connection and stream
set-up shared by both), :mod:`.cli`.
"""
