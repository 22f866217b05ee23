provider "aws" {
  region = var.region

  # Every taggable resource gets these tags, including those created inside the modules.
  default_tags {
    tags = merge(
      {
        Project     = var.name
        Environment = var.environment
        ManagedBy   = "terraform"
        Repository  = "imgpipe/infra/terraform"
      },
      var.tags,
    )
  }
}

# The helm provider talks to the cluster created here. It authenticates with a short-lived token
# from `aws eks get-token` (the AWS CLI must be on the PATH of whoever runs terraform), so no
# kubeconfig and no long-lived credential is involved.
provider "helm" {
  kubernetes {
    host                   = module.eks.cluster_endpoint
    cluster_ca_certificate = base64decode(module.eks.cluster_certificate_authority_data)

    exec {
      api_version = "client.authentication.k8s.io/v1beta1"
      command     = "aws"
      args        = ["eks", "get-token", "--cluster-name", module.eks.cluster_name, "--region", var.region]
    }
  }
}
