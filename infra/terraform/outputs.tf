# Outputs, and the Helm values built from them. The two `helm_*values` outputs are written to files
# and passed to `helm install` (README, step 4):
#   terraform output -raw helm_values        > values-aws.yaml          (no secrets)
#   terraform output -raw helm_secret_values > values-aws-secrets.yaml  (secrets: keep it out of git)

locals {
  image_repositories = { for c in local.components : c => aws_ecr_repository.service[c].name }
  irsa_role_arns     = { for c in local.components : c => aws_iam_role.component[c].arn }

  # Keys follow deploy/helm/imgpipe/values.yaml (its values.schema.json rejects unknown keys).
  helm_values = merge(
    {
      config = {
        s3 = {
          bucket = aws_s3_bucket.images.id
          region = var.region
        }
      }
      ingress = {
        enabled   = var.enable_ingress_nginx
        className = var.ingress_class_name
      }
      # Bundled RabbitMQ/Redis only where the managed service is not used. The bundled RabbitMQ
      # serves its per-queue metrics (/metrics/per-object, port 9419), which the chart's queue
      # alerts read; a Prometheus scrapes them with `rabbitmq.metrics.serviceMonitor.perObject`.
      rabbitmq = merge(
        { enabled = !var.enable_amazon_mq },
        var.enable_amazon_mq ? {} : { metrics = { enabled = true } },
      )
      redis    = { enabled = !var.enable_elasticache }
    },
    {
      for c in local.components : c => merge(
        {
          image = {
            registry   = local.ecr_registry
            repository = local.image_repositories[c]
            tag        = var.image_tag
          }
          serviceAccount = {
            name = var.service_account_names[c]
            annotations = {
              "eks.amazonaws.com/role-arn" = local.irsa_role_arns[c]
            }
          }
        },
        # KEDA when this configuration installs it, else a CPU HorizontalPodAutoscaler. Stated
        # rather than left to the chart's `auto`, which decides from the cluster's APIs and so
        # renders the HPA wherever the chart is rendered offline (helm template, GitOps).
        c == "worker" ? { autoscaling = { type = var.enable_keda ? "keda" : "hpa" } } : {},
      )
    },
  )

  helm_secret_values = merge(
    {
      secrets = merge(
        { jwtSecret = random_password.jwt.result },
        var.enable_amazon_mq ? { amqpUrl = local.amqp_url } : {},
        var.enable_elasticache ? { redisUrl = local.redis_url } : {},
      )
    },
    var.enable_amazon_mq ? {} : { rabbitmq = { auth = { password = random_password.bundled_rabbitmq[0].result } } },
    var.enable_elasticache ? {} : { redis = { auth = { password = random_password.bundled_redis[0].result } } },
  )
}

output "region" {
  description = "AWS region of every resource (IMGPIPE_S3_REGION of the services)."
  value       = var.region
}

output "cluster_name" {
  description = "Name of the EKS cluster."
  value       = module.eks.cluster_name
}

output "cluster_endpoint" {
  description = "Endpoint of the Kubernetes API."
  value       = module.eks.cluster_endpoint
}

output "configure_kubectl" {
  description = "Command that writes a kubeconfig entry for the cluster."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${module.eks.cluster_name}"
}

output "vpc_id" {
  description = "ID of the VPC."
  value       = module.vpc.vpc_id
}

output "private_subnet_ids" {
  description = "Private subnets (nodes, pods, broker, Redis)."
  value       = module.vpc.private_subnets
}

output "bucket_name" {
  description = "The uploads/variants bucket (IMGPIPE_S3_BUCKET)."
  value       = aws_s3_bucket.images.id
}

output "bucket_arn" {
  description = "ARN of the uploads/variants bucket."
  value       = aws_s3_bucket.images.arn
}

output "ecr_registry" {
  description = "ECR registry host, for `docker login` and the chart's image.registry."
  value       = local.ecr_registry
}

output "ecr_repository_urls" {
  description = "ECR repository URL of each component (api, status, worker, reconciler)."
  value       = { for c in local.components : c => aws_ecr_repository.service[c].repository_url }
}

output "irsa_role_arns" {
  description = "IAM role ARN of each component, for its ServiceAccount's eks.amazonaws.com/role-arn annotation."
  value       = local.irsa_role_arns
}

output "service_account_names" {
  description = "Namespace and ServiceAccount names the IRSA roles trust."
  value       = { for c in local.components : c => "${var.k8s_namespace}/${var.service_account_names[c]}" }
}

output "amqp_endpoint" {
  description = "AMQPS endpoint of the Amazon MQ broker (null when the chart's bundled RabbitMQ is used)."
  value       = local.amqp_endpoint
}

output "amqp_url" {
  description = "IMGPIPE_AMQP_URL for the Amazon MQ broker, with credentials (null when bundled RabbitMQ is used)."
  value       = local.amqp_url
  sensitive   = true
}

output "amqp_secret_arn" {
  description = "Secrets Manager secret with the broker credentials and URL (null when bundled RabbitMQ is used)."
  value       = var.enable_amazon_mq ? aws_secretsmanager_secret.amqp[0].arn : null
}

output "redis_endpoint" {
  description = "Primary endpoint of the ElastiCache replication group (null when the chart's bundled Redis is used)."
  value       = local.redis_host
}

output "redis_url" {
  description = "IMGPIPE_REDIS_URL (rediss://, with the AUTH token) for ElastiCache (null when bundled Redis is used)."
  value       = local.redis_url
  sensitive   = true
}

output "redis_secret_arn" {
  description = "Secrets Manager secret with the Redis AUTH token and URL (null when bundled Redis is used)."
  value       = var.enable_elasticache ? aws_secretsmanager_secret.redis[0].arn : null
}

output "jwt_secret" {
  description = "IMGPIPE_JWT_SECRET (HS256 key) the release is installed with; used to mint a first token."
  value       = random_password.jwt.result
  sensitive   = true
}

output "keda_installed" {
  description = "Whether KEDA is installed (the worker's autoscaling.type is keda only then)."
  value       = var.enable_keda
}

output "helm_values" {
  description = "Non-secret Helm values for deploy/helm/imgpipe: images from ECR, IRSA annotations, bucket and region, ingress, bundled or managed RabbitMQ/Redis. `terraform output -raw helm_values > values-aws.yaml`."
  value       = yamlencode(local.helm_values)
}

output "helm_secret_values" {
  description = "Secret Helm values: JWT secret, managed AMQP/Redis URLs or the bundled charts' passwords. `terraform output -raw helm_secret_values > values-aws-secrets.yaml` (never commit it)."
  value       = yamlencode(local.helm_secret_values)
  sensitive   = true
}
