# Versions: Terraform itself, every provider and (in vpc.tf / eks.tf) every module are pinned to a
# major version, so a `terraform init -upgrade` picks up fixes but never a breaking release.
terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # terraform-aws-modules/eks 20.x (>= 20.31) needs a recent 5.x; 6.x is not supported by eks 20.x.
      version = "~> 5.95"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 2.16"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }

  # State: local by default so `terraform apply` works on a fresh account. For a team, copy
  # backend.tf.example to backend.tf (an S3 backend with native locking) before `terraform init`.
}
