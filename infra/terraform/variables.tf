# ------------------------------------------------------------------------------------------------
# General
# ------------------------------------------------------------------------------------------------

variable "name" {
  description = "Name prefix of every resource (cluster, bucket, repositories, roles). Lower-case letters, digits and dashes."
  type        = string
  default     = "imgpipe"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,22}[a-z0-9]$", var.name))
    error_message = "name must be 3-24 characters of lower-case letters, digits and dashes, starting with a letter."
  }
}

variable "environment" {
  description = "Environment label (tag only; the services' IMGPIPE_ENV is set by the Helm chart)."
  type        = string
  default     = "production"

  validation {
    condition     = contains(["staging", "production", "dev"], var.environment)
    error_message = "environment must be one of dev, staging, production."
  }
}

variable "region" {
  description = "AWS region for every resource; also the services' IMGPIPE_S3_REGION (the bucket's region)."
  type        = string
  default     = "eu-west-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must look like an AWS region, e.g. eu-west-1."
  }
}

variable "tags" {
  description = "Extra tags merged into the provider's default_tags (applied to every resource)."
  type        = map(string)
  default     = {}
}

# ------------------------------------------------------------------------------------------------
# Network
# ------------------------------------------------------------------------------------------------

variable "vpc_cidr" {
  description = "CIDR of the VPC. A /16 is split into /20 private (nodes and pods) and /24 public subnets, one of each per availability zone."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) <= 16
    error_message = "vpc_cidr must be a valid IPv4 CIDR of size /16 or larger."
  }
}

variable "az_count" {
  description = "Number of availability zones to spread subnets, nodes and (optionally) the broker and Redis over (at most the number of availability_zones when those are given)."
  type        = number
  default     = 3

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 4
    error_message = "az_count must be between 2 and 4 (EKS needs subnets in at least two zones)."
  }
}

variable "availability_zones" {
  description = "Explicit availability zone names (e.g. [\"eu-west-1a\", \"eu-west-1b\", \"eu-west-1c\"]). Empty = the first az_count standard zones of the region, in name order."
  type        = list(string)
  default     = []

  validation {
    condition     = length(var.availability_zones) == 0 || length(var.availability_zones) >= 2
    error_message = "availability_zones must be empty or name at least two zones."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for the whole VPC (cheaper) instead of one per availability zone (survives the loss of a zone)."
  type        = bool
  default     = false
}

variable "enable_vpc_flow_logs" {
  description = "Send VPC flow logs to CloudWatch Logs."
  type        = bool
  default     = true
}

variable "flow_log_retention_days" {
  description = "Retention of the VPC flow log group, in days."
  type        = number
  default     = 365
}

# ------------------------------------------------------------------------------------------------
# EKS
# ------------------------------------------------------------------------------------------------

variable "cluster_version" {
  description = "Kubernetes version of the EKS control plane and its managed node groups."
  type        = string
  default     = "1.31"

  validation {
    condition     = can(regex("^1\\.[0-9]{2}$", var.cluster_version))
    error_message = "cluster_version must look like 1.31."
  }
}

variable "cluster_endpoint_public_access" {
  description = "Expose the Kubernetes API endpoint publicly (restricted to cluster_endpoint_public_access_cidrs). When false, terraform, helm and kubectl must run from inside the VPC (VPN, bastion)."
  type        = bool
  default     = true
}

variable "cluster_endpoint_public_access_cidrs" {
  description = "CIDRs allowed to reach the public Kubernetes API endpoint. Narrow this to your office/VPN/CI egress addresses."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = alltrue([for c in var.cluster_endpoint_public_access_cidrs : can(cidrhost(c, 0))])
    error_message = "cluster_endpoint_public_access_cidrs must be valid CIDRs."
  }
}

variable "node_instance_types" {
  description = "Instance types of the managed node group (the first is preferred). Image work is CPU-bound: compute-optimised types fit the worker."
  type        = list(string)
  default     = ["c6i.xlarge", "c5.xlarge"]

  validation {
    condition     = length(var.node_instance_types) > 0
    error_message = "node_instance_types needs at least one instance type."
  }
}

variable "node_capacity_type" {
  description = "ON_DEMAND or SPOT for the managed node group. The worker tolerates SPOT (unacked jobs return to the queue)."
  type        = string
  default     = "ON_DEMAND"

  validation {
    condition     = contains(["ON_DEMAND", "SPOT"], var.node_capacity_type)
    error_message = "node_capacity_type must be ON_DEMAND or SPOT."
  }
}

variable "node_min_size" {
  description = "Minimum number of nodes in the managed node group."
  type        = number
  default     = 2
}

variable "node_max_size" {
  description = "Maximum number of nodes in the managed node group (KEDA scales worker pods; add the cluster autoscaler or Karpenter to scale nodes)."
  type        = number
  default     = 6
}

variable "node_desired_size" {
  description = "Initial number of nodes. Changes after creation are ignored by the module (the autoscaler owns it)."
  type        = number
  default     = 3

  validation {
    condition     = var.node_desired_size >= 1
    error_message = "node_desired_size must be at least 1."
  }
}

variable "node_disk_size_gb" {
  description = "Size of each node's encrypted gp3 root volume, in GiB."
  type        = number
  default     = 50
}

# ------------------------------------------------------------------------------------------------
# Kubernetes side (must match the Helm chart)
# ------------------------------------------------------------------------------------------------

variable "k8s_namespace" {
  description = "Namespace the imgpipe Helm release is installed into (the IRSA trust policies name it)."
  type        = string
  default     = "imgpipe"
}

variable "service_account_names" {
  description = "Kubernetes service account of each component, as the Helm chart names them (release name `imgpipe`). The IRSA role of a component trusts exactly this account."
  type        = map(string)
  default = {
    api        = "imgpipe-api"
    status     = "imgpipe-status"
    worker     = "imgpipe-worker"
    reconciler = "imgpipe-reconciler"
  }

  validation {
    condition     = length(setsubtract(["api", "status", "worker", "reconciler"], keys(var.service_account_names))) == 0
    error_message = "service_account_names must name the service account of api, status, worker and reconciler."
  }
}

variable "enable_keda" {
  description = "Install KEDA (kedacore/keda Helm chart) so the chart's ScaledObject can scale the worker on queue depth."
  type        = bool
  default     = true
}

variable "keda_chart_version" {
  description = "Pinned version of the kedacore/keda Helm chart."
  type        = string
  default     = "2.16.1"
}

variable "enable_ingress_nginx" {
  description = "Install ingress-nginx behind an AWS Network Load Balancer, the ingress class the chart's Ingress uses on EKS."
  type        = bool
  default     = true
}

variable "ingress_nginx_chart_version" {
  description = "Pinned version of the ingress-nginx Helm chart."
  type        = string
  default     = "4.11.3"
}

variable "ingress_class_name" {
  description = "IngressClass name written into helm_values (ingress-nginx creates `nginx`)."
  type        = string
  default     = "nginx"
}

variable "image_tag" {
  description = "Image tag written into helm_values. ECR tags are immutable: use a version or git SHA, never `latest`."
  type        = string
  default     = "0.1.0"

  validation {
    condition     = var.image_tag != "latest" && can(regex("^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$", var.image_tag))
    error_message = "image_tag must be a valid Docker tag other than `latest` (tags are immutable)."
  }
}

# ------------------------------------------------------------------------------------------------
# S3
# ------------------------------------------------------------------------------------------------

variable "bucket_name" {
  description = "Name of the uploads/variants bucket (IMGPIPE_S3_BUCKET). null = `<name>-<account id>-<region>`, which is globally unique."
  type        = string
  default     = null

  validation {
    condition     = var.bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a valid S3 bucket name (3-63 lower-case letters, digits, dots, dashes)."
  }
}

variable "bucket_force_destroy" {
  description = "Allow `terraform destroy` to delete the bucket while it still holds objects. Keep false in production."
  type        = bool
  default     = false
}

variable "s3_kms_key_arn" {
  description = "ARN of a customer-managed KMS key for the bucket's default encryption (SSE-KMS). null = SSE-S3 (AES-256, no KMS cost). With a key, the IRSA roles get kms:Decrypt/GenerateDataKey on it."
  type        = string
  default     = null

  validation {
    condition     = var.s3_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:", var.s3_kms_key_arn))
    error_message = "s3_kms_key_arn must be a KMS key ARN or null."
  }
}

variable "s3_versioning" {
  description = "Enable bucket versioning. Off by default: variants are reproducible and uploads are transient inputs, and with versioning the reconciler's deletes would only add delete markers. When on, old versions expire after s3_noncurrent_version_expiration_days."
  type        = bool
  default     = false
}

variable "s3_noncurrent_version_expiration_days" {
  description = "With s3_versioning, days after which noncurrent object versions are deleted."
  type        = number
  default     = 30

  validation {
    condition     = var.s3_noncurrent_version_expiration_days >= 1
    error_message = "s3_noncurrent_version_expiration_days must be at least 1."
  }
}

variable "s3_abort_incomplete_multipart_days" {
  description = "Days after which incomplete multipart uploads are aborted (their parts are billed until then)."
  type        = number
  default     = 2

  validation {
    condition     = var.s3_abort_incomplete_multipart_days >= 1
    error_message = "s3_abort_incomplete_multipart_days must be at least 1."
  }
}

# The two expirations below delete objects whatever references them: a job record (kept
# IMGPIPE_JOB_RETENTION_DAYS after its last change; the chart's config.jobRetentionDays, 7 by
# default, which this configuration does not set) would then point at deleted variants, or a
# pending job at a deleted source. Hence at least 7 days, and at least the retention you deploy.

variable "variants_expiration_days" {
  description = "Delete objects under variants/ this many days after creation. Must be at least IMGPIPE_JOB_RETENTION_DAYS (the chart's config.jobRetentionDays, 7 by default), or S3 deletes variants that job records still link to; at least 7 is enforced. null = keep them (the reconciler still deletes orphans)."
  type        = number
  default     = null

  validation {
    condition     = var.variants_expiration_days == null || try(var.variants_expiration_days >= 7, false)
    error_message = "variants_expiration_days must be null or at least 7 (and at least the chart's config.jobRetentionDays / IMGPIPE_JOB_RETENTION_DAYS)."
  }
}

variable "uploads_expiration_days" {
  description = "Delete source images under uploads/ this many days after upload. Must be at least IMGPIPE_JOB_RETENTION_DAYS (the chart's config.jobRetentionDays, 7 by default), or S3 deletes sources of jobs still on record (a pending or retried job then fails); at least 7 is enforced. null = keep them."
  type        = number
  default     = null

  validation {
    condition     = var.uploads_expiration_days == null || try(var.uploads_expiration_days >= 7, false)
    error_message = "uploads_expiration_days must be null or at least 7 (and at least the chart's config.jobRetentionDays / IMGPIPE_JOB_RETENTION_DAYS)."
  }
}

variable "cors_allowed_origins" {
  description = "Browser origins allowed to POST presigned uploads straight to the bucket and to fetch variants (CORS). Empty = no CORS rule (server-side clients only)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for o in var.cors_allowed_origins : can(regex("^https?://", o))])
    error_message = "cors_allowed_origins must be full origins such as https://app.example.com."
  }
}

variable "s3_access_log_bucket" {
  description = "Existing bucket that receives S3 server access logs of the imgpipe bucket (prefix `<bucket>/`). null = no access logging."
  type        = string
  default     = null
}

# ------------------------------------------------------------------------------------------------
# ECR
# ------------------------------------------------------------------------------------------------

variable "ecr_keep_images" {
  description = "How many images each ECR repository keeps; older ones are expired by a lifecycle policy."
  type        = number
  default     = 30

  validation {
    condition     = var.ecr_keep_images >= 1
    error_message = "ecr_keep_images must be at least 1."
  }
}

variable "ecr_kms_key_arn" {
  description = "Customer-managed KMS key for ECR image encryption. null = the AWS-managed aws/ecr key."
  type        = string
  default     = null
}

variable "ecr_force_delete" {
  description = "Allow `terraform destroy` to delete repositories that still hold images."
  type        = bool
  default     = false
}

# ------------------------------------------------------------------------------------------------
# Amazon MQ for RabbitMQ (optional; otherwise the chart's bundled RabbitMQ)
# ------------------------------------------------------------------------------------------------

variable "enable_amazon_mq" {
  description = "Create an Amazon MQ for RabbitMQ broker. false = use the Helm chart's bundled RabbitMQ."
  type        = bool
  default     = false
}

variable "mq_engine_version" {
  description = "RabbitMQ engine version. imgpipe uses quorum queues, which Amazon MQ supports from 3.13."
  type        = string
  default     = "3.13"

  validation {
    condition     = can(regex("^(3\\.1[3-9]|[4-9]\\.[0-9]+)", var.mq_engine_version))
    error_message = "mq_engine_version must be 3.13 or later (quorum queues)."
  }
}

variable "mq_instance_type" {
  description = "Broker instance type. mq.t3.micro is single-instance only and fit for trials; use mq.m5.large or larger in production."
  type        = string
  default     = "mq.m5.large"
}

variable "mq_deployment_mode" {
  description = "SINGLE_INSTANCE (one broker in one zone) or CLUSTER_MULTI_AZ (three nodes in three zones; quorum queues replicate across them)."
  type        = string
  default     = "SINGLE_INSTANCE"

  validation {
    condition     = contains(["SINGLE_INSTANCE", "CLUSTER_MULTI_AZ"], var.mq_deployment_mode)
    error_message = "mq_deployment_mode must be SINGLE_INSTANCE or CLUSTER_MULTI_AZ."
  }
}

variable "mq_username" {
  description = "Name of the broker user imgpipe connects as."
  type        = string
  default     = "imgpipe"

  validation {
    condition     = can(regex("^[A-Za-z0-9_-]{2,100}$", var.mq_username)) && var.mq_username != "guest"
    error_message = "mq_username must be 2-100 letters, digits, underscores or dashes, and not guest."
  }
}

# ------------------------------------------------------------------------------------------------
# ElastiCache for Redis (optional; otherwise the chart's bundled Redis)
# ------------------------------------------------------------------------------------------------

variable "enable_elasticache" {
  description = "Create an ElastiCache for Redis replication group (TLS, AUTH token, encryption at rest). false = use the Helm chart's bundled Redis."
  type        = bool
  default     = false
}

variable "redis_engine_version" {
  description = "Redis engine version of the replication group (6.x or 7.x; the parameter group created here follows its major version)."
  type        = string
  default     = "7.1"

  validation {
    condition     = can(regex("^[67]\\.([0-9]+|x)$", var.redis_engine_version))
    error_message = "redis_engine_version must be a Redis 6 or 7 version such as 7.1 or 6.x."
  }
}

variable "redis_parameter_group_name" {
  description = "An existing parameter group to use instead of the one created here, matching redis_engine_version. It must set maxmemory-policy to noeviction: every imgpipe key has a TTL, so a volatile-* policy (the default groups' volatile-lru) or an allkeys-* one evicts job records under memory pressure and accepted jobs are lost. null = create a group with noeviction."
  type        = string
  default     = null

  validation {
    condition     = var.redis_parameter_group_name == null || !startswith(coalesce(var.redis_parameter_group_name, "-"), "default.")
    error_message = "redis_parameter_group_name cannot be an AWS default group (default.redis*): they use maxmemory-policy volatile-lru, which evicts imgpipe's job records. Leave it null, or give a group with noeviction."
  }
}

variable "redis_node_type" {
  description = "ElastiCache node type."
  type        = string
  default     = "cache.t4g.small"
}

variable "redis_multi_az" {
  description = "A replica in another zone with automatic failover (two nodes instead of one)."
  type        = bool
  default     = true
}

variable "redis_snapshot_retention_days" {
  description = "Days of automatic daily snapshots kept (0 disables them). Job records are short-lived, but snapshots make a failover or a restart less disruptive."
  type        = number
  default     = 1
}

variable "secrets_recovery_window_days" {
  description = "Recovery window of the Secrets Manager secrets holding the broker and Redis credentials (0 = delete at once, 7-30 otherwise)."
  type        = number
  default     = 7

  validation {
    condition     = var.secrets_recovery_window_days == 0 || (var.secrets_recovery_window_days >= 7 && var.secrets_recovery_window_days <= 30)
    error_message = "secrets_recovery_window_days must be 0 or between 7 and 30."
  }
}

variable "secrets_kms_key_arn" {
  description = "Customer-managed KMS key for the Secrets Manager secrets and for Redis at rest. null = AWS-managed keys. (The RabbitMQ broker always uses an AWS-owned key.)"
  type        = string
  default     = null
}
