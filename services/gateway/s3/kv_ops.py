"""S3 on KV buckets: which operations serve them. Their objects are served by the KV-cache
tier (DRAM pools with eviction, TTL, pins and quotas) instead of the erasure-coded tier. Put,
Get (ranges, partNumber), Head, Delete, DeleteObjects, ListObjects(V2) and multipart uploads
behave as on any bucket: the same handlers, through the bucket's object layer
(`kv_layer.KVLayer`; its uploads' parts staged as KV blocks: `kv_multipart`); copies (and
UploadPartCopy) are NotImplemented. Objects hold at most `kv_layout.MAX_KV_OBJECT_BYTES`
(64 MiB), exactly: one byte more is EntityTooLarge (the layer's limit), a PUT's plain HTTP
chunked body included (counted as it comes).

Blocks live in the bucket's namespace (`s3:<storage name>`, i.e. `s3:<bucket>@<storage_id>`,
plain `s3:<bucket>` for buckets older than storage ids, so a bucket deleted and created again
never sees the earlier one's blocks; the bucket's tenant). An object is a data block (a 16-byte
version id, then the bytes), a tail block with the same id when 64 MiB do not fit one block
with the id, and a metadata block carrying the id (layout: `kv_layout`). A PUT writes the data
blocks, then the metadata block (put-if-absent with If-None-Match: * claims the metadata block
first). A GET reads the metadata (size, version), then the data blocks, and retries when the
versions differ (a concurrent overwrite): it never returns one writer's headers with another's
bytes. Any block may be evicted: the object is then gone (NoSuchKey).
"""

from __future__ import annotations

from services.gateway.s3 import lifecycle_ops, tagging_ops

#: Operations whose handlers serve either bucket kind through the bucket's object layer
#: (`S3Server.layer`: a `kv_layer.KVLayer` for a KV bucket), conditions, ranges, parts and
#: checksums in one place (`object_ops`, `multipart_ops`); the operations in neither this
#: nor SHARED are NotImplemented on a KV bucket.
LAYERED = frozenset(
    {
        "PutObject", "GetObject", "HeadObject", "GetObjectAttributes", "ListObjects",
        "DeleteObject", "DeleteObjects",
        "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "ListParts",
        "AbortMultipartUpload", "ListMultipartUploads",
        # A KV object's tags are its PUT's (changes NotImplemented), its ACL private.
        "GetObjectTagging", "PutObjectTagging", "DeleteObjectTagging", "GetObjectAcl",
        "PutObjectAcl",
    }
)  # fmt: skip
#: Operations that work the same on every bucket kind.
SHARED = frozenset(
    {
        "CreateBucket", "HeadBucket", "DeleteBucket", "GetBucketLocation", "GetBucketVersioning",
        "PutBucketVersioning", "GetBucketCors", "PutBucketCors", "DeleteBucketCors",
        "OptionsPreflight",
        # BucketOwnerEnforced only (`ownership`): what KV buckets do.
        "GetBucketOwnershipControls", "PutBucketOwnershipControls",
        "DeleteBucketOwnershipControls",
    }
    | lifecycle_ops.OPS
    | tagging_ops.BUCKET_OPS
)  # fmt: skip
