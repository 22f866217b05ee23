# The one bucket imgpipe uses (IMGPIPE_S3_BUCKET):
#   uploads/{owner}/{random}               sources, written by clients through presigned POSTs
#   variants/{owner}/{job}/{name}.{ext}    outputs, written by the worker (deterministic keys)
#
# Versioning is OFF by default, on purpose (see README "Versioning"): every variant can be rendered
# again from its source, redelivered jobs overwrite their own keys, and the reconciler deletes
# orphans to free storage. With versioning those deletes would only add delete markers and every
# overwrite would keep a noncurrent copy. `s3_versioning = true` turns it on, with old versions
# expiring after `s3_noncurrent_version_expiration_days`, for those who want undo for deletions.

resource "aws_s3_bucket" "images" {
  bucket        = local.bucket_name
  force_destroy = var.bucket_force_destroy
}

resource "aws_s3_bucket_ownership_controls" "images" {
  bucket = aws_s3_bucket.images.id

  # ACLs are disabled: access is decided by IAM and the bucket policy alone.
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "images" {
  bucket = aws_s3_bucket.images.id

  # Nothing is public: clients read and write only through presigned URLs.
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "images" {
  bucket = aws_s3_bucket.images.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.s3_kms_key_arn == null ? "AES256" : "aws:kms"
      kms_master_key_id = var.s3_kms_key_arn
    }
    # S3 Bucket Keys cut KMS request costs when a customer key is used.
    bucket_key_enabled = var.s3_kms_key_arn != null
  }
}

resource "aws_s3_bucket_versioning" "images" {
  count  = var.s3_versioning ? 1 : 0
  bucket = aws_s3_bucket.images.id

  # Removing this resource later (s3_versioning = false) suspends versioning on the bucket.
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "images" {
  bucket = aws_s3_bucket.images.id

  # Parts of abandoned multipart uploads are billed but invisible: abort them.
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = var.s3_abort_incomplete_multipart_days
    }
  }

  rule {
    id     = "expire-variants"
    status = var.variants_expiration_days == null ? "Disabled" : "Enabled"

    filter {
      prefix = "variants/"
    }

    expiration {
      days = coalesce(var.variants_expiration_days, 365)
    }
  }

  rule {
    id     = "expire-uploads"
    status = var.uploads_expiration_days == null ? "Disabled" : "Enabled"

    filter {
      prefix = "uploads/"
    }

    expiration {
      days = coalesce(var.uploads_expiration_days, 365)
    }
  }

  dynamic "rule" {
    for_each = var.s3_versioning ? [1] : []

    content {
      id     = "expire-noncurrent-versions"
      status = "Enabled"

      filter {}

      noncurrent_version_expiration {
        noncurrent_days = var.s3_noncurrent_version_expiration_days
      }

      expiration {
        expired_object_delete_marker = true
      }
    }
  }

  # Versioning must be settled before lifecycle rules that depend on it.
  depends_on = [aws_s3_bucket_versioning.images]
}

resource "aws_s3_bucket_cors_configuration" "images" {
  count  = length(var.cors_allowed_origins) > 0 ? 1 : 0
  bucket = aws_s3_bucket.images.id

  # Browser uploads: a multipart/form-data POST with the presigned fields (api POST /uploads).
  cors_rule {
    allowed_methods = ["POST"]
    allowed_origins = var.cors_allowed_origins
    allowed_headers = ["*"]
    expose_headers  = ["ETag", "Location"]
    max_age_seconds = 3000
  }

  # Browser downloads of variants through their presigned GET URLs (fetch/XHR; <img> needs none).
  cors_rule {
    allowed_methods = ["GET", "HEAD"]
    allowed_origins = var.cors_allowed_origins
    allowed_headers = ["*"]
    max_age_seconds = 3000
  }
}

resource "aws_s3_bucket_logging" "images" {
  count  = var.s3_access_log_bucket == null ? 0 : 1
  bucket = aws_s3_bucket.images.id

  target_bucket = var.s3_access_log_bucket
  target_prefix = "${local.bucket_name}/"
}

# TLS only (and TLS 1.2 or later): plain-HTTP requests are refused whoever signs them, including the
# presigned URLs handed to clients.
data "aws_iam_policy_document" "images_bucket" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.images.arn,
      "${aws_s3_bucket.images.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid     = "DenyOutdatedTls"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.images.arn,
      "${aws_s3_bucket.images.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }
}

resource "aws_s3_bucket_policy" "images" {
  bucket = aws_s3_bucket.images.id
  policy = data.aws_iam_policy_document.images_bucket.json

  # A bucket policy cannot be put while the public access block is still being created.
  depends_on = [aws_s3_bucket_public_access_block.images]
}
