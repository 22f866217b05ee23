# Shared lookups and names. Each concern has its own file: vpc.tf, eks.tf, s3.tf, ecr.tf, iam.tf,
# mq.tf, elasticache.tf, secrets.tf, addons.tf (KEDA, ingress-nginx).

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_availability_zones" "available" {
  state = "available"

  # An allow-list of zone names: the explicit `availability_zones`, or else the region's standard
  # zones `<region>a` to `<region>f`. Local Zones and Wavelength Zones (`<region>-lax-1a`, …)
  # never match, since they cannot host EKS control-plane subnets.
  filter {
    name   = "zone-name"
    values = length(var.availability_zones) > 0 ? var.availability_zones : [for l in ["a", "b", "c", "d", "e", "f"] : "${var.region}${l}"]
  }
}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  azs        = slice(sort(data.aws_availability_zones.available.names), 0, min(var.az_count, length(data.aws_availability_zones.available.names)))

  cluster_name = var.name
  bucket_name  = coalesce(var.bucket_name, "${var.name}-${local.account_id}-${var.region}")

  # The components that run as their own pods, get an image and an IRSA role.
  components = ["api", "status", "worker", "reconciler"]
}
