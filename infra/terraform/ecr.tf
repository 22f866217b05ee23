# One ECR repository per component: <name>/api, <name>/status, <name>/worker, <name>/reconciler.
# Tags are immutable (a tag always means the same image, so a rollout is reproducible), every push is
# scanned, images are encrypted with KMS (the AWS-managed aws/ecr key unless ecr_kms_key_arn is set),
# and a lifecycle policy keeps the last ecr_keep_images images.

resource "aws_ecr_repository" "service" {
  for_each = toset(local.components)

  name                 = "${var.name}/${each.key}"
  image_tag_mutability = "IMMUTABLE"
  force_delete         = var.ecr_force_delete

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = var.ecr_kms_key_arn
  }
}

resource "aws_ecr_lifecycle_policy" "service" {
  for_each   = aws_ecr_repository.service
  repository = each.value.name

  policy = jsonencode({
    rules = [
      {
        rulePriority = 1
        description  = "Expire untagged images (interrupted pushes) after 7 days"
        selection = {
          tagStatus   = "untagged"
          countType   = "sinceImagePushed"
          countUnit   = "days"
          countNumber = 7
        }
        action = { type = "expire" }
      },
      {
        rulePriority = 2
        description  = "Keep the last ${var.ecr_keep_images} images"
        selection = {
          tagStatus   = "any"
          countType   = "imageCountMoreThan"
          countNumber = var.ecr_keep_images
        }
        action = { type = "expire" }
      },
    ]
  })
}

locals {
  # <account>.dkr.ecr.<region>.amazonaws.com (or .com.cn): the host part of any repository URL.
  ecr_registry = split("/", aws_ecr_repository.service["api"].repository_url)[0]
}
