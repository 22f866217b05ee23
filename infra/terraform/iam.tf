# IRSA: one IAM role per component, assumable only by that component's Kubernetes service account
# (namespace and name pinned in the trust policy, audience sts.amazonaws.com), through the cluster's
# OIDC provider. Plain aws_iam_role resources rather than the iam-role-for-service-accounts-eks
# module: the policies are the point here, they stay readable in one place, and checkov scans them
# (it cannot look inside registry modules offline).
#
# Least privilege, from what each service does with S3 (pkg/src/imgpipe/storage.py):
#
# | component  | S3 calls                                             | grants                                  |
# |------------|------------------------------------------------------|-----------------------------------------|
# | every one  | HeadBucket (/readyz)                                 | s3:ListBucket on the bucket             |
# | api        | presigned POST to uploads/ (signed with its creds),  | s3:PutObject, s3:GetObject on uploads/* |
# |            | HeadObject on the source of POST /jobs               |                                         |
# | status     | presigned GET of variants (signed with its creds)    | s3:GetObject on variants/*              |
# | worker     | HeadObject + GetObject of sources, PutObject variants| s3:GetObject on uploads/*,              |
# |            |                                                      | s3:PutObject on variants/*              |
# | reconciler | ListObjectsV2, DeleteObjects (batched) of orphans;   | s3:ListBucket, s3:DeleteObject on       |
# |            | GetObject + PutObject of its namespace marker        | uploads/* and variants/*; s3:GetObject, |
# |            | (imgpipe-namespace, the bucket's one namespace)      | s3:PutObject on imgpipe-namespace       |
#
# s3:ListBucket is what HeadBucket needs, and it is also what makes HeadObject answer 404 (not 403)
# for a missing key, which the api relies on to answer `source_not_found`. The status service calls
# nothing (its /readyz does not probe S3), but the links it signs are its requests: with the grant,
# a variant the lifecycle rule (variants_expiration_days) has deleted answers a client 404, not 403. With s3_kms_key_arn set,
# writers also get kms:GenerateDataKey and readers kms:Decrypt on that key.

locals {
  bucket_arn   = aws_s3_bucket.images.arn
  uploads_arn  = "${aws_s3_bucket.images.arn}/uploads/*"
  variants_arn = "${aws_s3_bucket.images.arn}/variants/*"
  # The object naming the namespace the bucket belongs to (services/reconciler reconcile.py).
  marker_arn = "${aws_s3_bucket.images.arn}/imgpipe-namespace"

  s3_grants = {
    api = {
      read   = [local.uploads_arn]
      write  = [local.uploads_arn]
      delete = []
    }
    status = {
      read   = [local.variants_arn]
      write  = []
      delete = []
    }
    worker = {
      read   = [local.uploads_arn]
      write  = [local.variants_arn]
      delete = []
    }
    reconciler = {
      read   = [local.marker_arn]
      write  = [local.marker_arn]
      delete = [local.uploads_arn, local.variants_arn]
    }
  }
}

data "aws_iam_policy_document" "irsa_trust" {
  for_each = toset(local.components)

  statement {
    sid     = "ServiceAccount${title(each.key)}"
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [module.eks.oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${module.eks.oidc_provider}:sub"
      values   = ["system:serviceaccount:${var.k8s_namespace}:${var.service_account_names[each.key]}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${module.eks.oidc_provider}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "s3_access" {
  for_each = local.s3_grants

  statement {
    sid       = "HeadAndListBucket"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
  }

  dynamic "statement" {
    for_each = length(each.value.read) > 0 ? [1] : []
    content {
      sid       = "ReadObjects"
      effect    = "Allow"
      actions   = ["s3:GetObject"]
      resources = each.value.read
    }
  }

  dynamic "statement" {
    for_each = length(each.value.write) > 0 ? [1] : []
    content {
      sid       = "WriteObjects"
      effect    = "Allow"
      actions   = ["s3:PutObject"]
      resources = each.value.write
    }
  }

  dynamic "statement" {
    for_each = length(each.value.delete) > 0 ? [1] : []
    content {
      sid       = "DeleteObjects"
      effect    = "Allow"
      actions   = ["s3:DeleteObject"]
      resources = each.value.delete
    }
  }

  dynamic "statement" {
    for_each = var.s3_kms_key_arn != null && length(concat(each.value.read, each.value.write)) > 0 ? [1] : []
    content {
      sid    = "UseBucketKey"
      effect = "Allow"
      actions = concat(
        ["kms:Decrypt"],
        length(each.value.write) > 0 ? ["kms:GenerateDataKey"] : [],
      )
      resources = [var.s3_kms_key_arn]

      # Only when S3 uses the key on the role's behalf.
      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["s3.${var.region}.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role" "component" {
  for_each = toset(local.components)

  name                 = "${var.name}-${each.key}"
  description          = "imgpipe ${each.key} (IRSA: ${var.k8s_namespace}/${var.service_account_names[each.key]})"
  assume_role_policy   = data.aws_iam_policy_document.irsa_trust[each.key].json
  max_session_duration = 3600
}

resource "aws_iam_policy" "s3_access" {
  for_each = local.s3_grants

  name        = "${var.name}-${each.key}-s3"
  description = "imgpipe ${each.key}: least-privilege access to s3://${local.bucket_name}"
  policy      = data.aws_iam_policy_document.s3_access[each.key].json
}

resource "aws_iam_role_policy_attachment" "s3_access" {
  for_each = local.s3_grants

  role       = aws_iam_role.component[each.key].name
  policy_arn = aws_iam_policy.s3_access[each.key].arn
}
