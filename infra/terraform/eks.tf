# EKS: one cluster with a managed node group in the private subnets, IRSA (an IAM OIDC provider for
# the cluster) for the per-component roles in iam.tf, and the EBS CSI driver so the chart's bundled
# RabbitMQ/Redis can have persistent volumes when the managed services are not used.
module "eks" {
  source  = "terraform-aws-modules/eks/aws"
  version = "~> 20.31"

  cluster_name    = local.cluster_name
  cluster_version = var.cluster_version

  cluster_endpoint_public_access       = var.cluster_endpoint_public_access
  cluster_endpoint_public_access_cidrs = var.cluster_endpoint_public_access_cidrs
  cluster_endpoint_private_access      = true

  # Access entries (API) rather than the aws-auth ConfigMap; whoever runs `terraform apply` becomes
  # cluster admin, so the README's `helm install` works straight away.
  authentication_mode                      = "API"
  enable_cluster_creator_admin_permissions = true

  # IRSA: creates the cluster's IAM OIDC provider; iam.tf trusts it.
  enable_irsa = true

  # Control-plane logs; Kubernetes secrets are envelope-encrypted with a KMS key the module creates.
  cluster_enabled_log_types = ["api", "audit", "authenticator"]

  vpc_id                   = module.vpc.vpc_id
  subnet_ids               = module.vpc.private_subnets
  control_plane_subnet_ids = module.vpc.private_subnets

  cluster_addons = {
    coredns    = { most_recent = true }
    kube-proxy = { most_recent = true }
    vpc-cni = {
      most_recent    = true
      before_compute = true
      # Its network policy agent enforces NetworkPolicies, the chart's worker egress policy among
      # them (without it they are accepted and do nothing).
      configuration_values = jsonencode({ enableNetworkPolicy = "true" })
    }
    aws-ebs-csi-driver = {
      most_recent              = true
      service_account_role_arn = aws_iam_role.ebs_csi.arn
      # EKS 1.30+ clusters have no default StorageClass: without one the bundled RabbitMQ and Redis
      # PVCs (which name none) stay Pending. The add-on makes an encrypted gp3 one, marked default.
      configuration_values = jsonencode({ defaultStorageClass = { enabled = true } })
    }
    # The CPU HPAs of api and status (and the worker's when KEDA is off) read the resource metrics
    # API, which EKS does not serve by itself (KEDA serves only external metrics).
    metrics-server = { most_recent = true }
  }

  eks_managed_node_groups = {
    default = {
      ami_type       = "AL2023_x86_64_STANDARD"
      instance_types = var.node_instance_types
      capacity_type  = var.node_capacity_type

      min_size     = var.node_min_size
      max_size     = var.node_max_size
      desired_size = var.node_desired_size

      # The module's launch template: encrypted gp3 root volume, IMDSv2 only. One hop: the
      # instance's metadata (and the node role's credentials) answer the node itself and
      # host-network pods (the VPC CNI), not a pod behind its own network namespace. Pods use IRSA;
      # a worker that fetches URLs for clients has no business reaching the node's credentials,
      # whatever a bug in its address checks let through (the module's default is 2 hops).
      metadata_options = {
        http_endpoint               = "enabled"
        http_tokens                 = "required"
        http_put_response_hop_limit = 1
        instance_metadata_tags      = "disabled"
      }
      block_device_mappings = {
        xvda = {
          device_name = "/dev/xvda"
          ebs = {
            volume_size           = var.node_disk_size_gb
            volume_type           = "gp3"
            encrypted             = true
            delete_on_termination = true
          }
        }
      }

      labels = {
        "imgpipe.io/pool" = "default"
      }
    }
  }
}

# The EBS CSI driver's controller role (AWS-managed policy), trusted only by its service account.
data "aws_iam_policy_document" "ebs_csi_trust" {
  statement {
    sid     = "EbsCsiControllerServiceAccount"
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [module.eks.oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${module.eks.oidc_provider}:sub"
      values   = ["system:serviceaccount:kube-system:ebs-csi-controller-sa"]
    }

    condition {
      test     = "StringEquals"
      variable = "${module.eks.oidc_provider}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "ebs_csi" {
  name               = "${var.name}-ebs-csi"
  description        = "EBS CSI driver controller (IRSA) for the ${local.cluster_name} cluster"
  assume_role_policy = data.aws_iam_policy_document.ebs_csi_trust.json
}

resource "aws_iam_role_policy_attachment" "ebs_csi" {
  role       = aws_iam_role.ebs_csi.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonEBSCSIDriverPolicy"
}
