# Optional Amazon MQ for RabbitMQ (enable_amazon_mq). Private subnets only, TLS (amqps, 5671) only,
# reachable from the EKS nodes (and so from the pods, which share the node security group under the
# VPC CNI). The password is generated here and kept in Secrets Manager; the Kubernetes Secret the
# chart reads (IMGPIPE_AMQP_URL) is made from it as the README shows. When disabled, the chart's
# bundled RabbitMQ is used instead.

locals {
  mq_subnet_ids = (
    var.mq_deployment_mode == "SINGLE_INSTANCE"
    ? [module.vpc.private_subnets[0]]
    : slice(module.vpc.private_subnets, 0, min(3, length(module.vpc.private_subnets)))
  )
}

resource "aws_security_group" "mq" {
  count = var.enable_amazon_mq ? 1 : 0

  name        = "${var.name}-mq"
  description = "Amazon MQ for RabbitMQ: AMQPS from the EKS nodes only"
  vpc_id      = module.vpc.vpc_id

  tags = {
    Name = "${var.name}-mq"
  }
}

resource "aws_vpc_security_group_ingress_rule" "mq_from_nodes" {
  count = var.enable_amazon_mq ? 1 : 0

  security_group_id            = aws_security_group.mq[0].id
  description                  = "AMQPS from the EKS nodes and pods"
  referenced_security_group_id = module.eks.node_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = 5671
  to_port                      = 5671
}

resource "random_password" "mq" {
  count = var.enable_amazon_mq ? 1 : 0

  # Amazon MQ refuses commas, colons and equals signs; alphanumerics also keep the AMQP URL valid
  # without percent-encoding.
  length  = 32
  special = false
}

resource "aws_mq_broker" "rabbitmq" {
  count = var.enable_amazon_mq ? 1 : 0

  broker_name        = var.name
  engine_type        = "RabbitMQ"
  engine_version     = var.mq_engine_version
  host_instance_type = var.mq_instance_type
  deployment_mode    = var.mq_deployment_mode

  publicly_accessible = false
  subnet_ids          = local.mq_subnet_ids
  security_groups     = [aws_security_group.mq[0].id]

  # 3.13 brokers must take minor upgrades automatically; they happen in the maintenance window.
  auto_minor_version_upgrade = true
  apply_immediately          = false

  maintenance_window_start_time {
    day_of_week = "SUNDAY"
    time_of_day = "03:00"
    time_zone   = "UTC"
  }

  # Encrypted at rest with an AWS-owned key: customer-managed keys are an ActiveMQ-only option.
  encryption_options {
    use_aws_owned_key = true
  }

  # RabbitMQ brokers publish general logs only (audit logs are an ActiveMQ feature).
  logs {
    general = true
  }

  user {
    username = var.mq_username
    password = random_password.mq[0].result
  }

  # Amazon MQ cannot update a RabbitMQ user after creation; rotation goes through the broker's
  # management API (README, "Day two"), so later differences here are not acted upon.
  lifecycle {
    ignore_changes = [user]
  }
}

resource "aws_secretsmanager_secret" "amqp" {
  count = var.enable_amazon_mq ? 1 : 0

  name                    = "${var.name}/amqp"
  description             = "imgpipe: Amazon MQ for RabbitMQ credentials and IMGPIPE_AMQP_URL"
  kms_key_id              = var.secrets_kms_key_arn
  recovery_window_in_days = var.secrets_recovery_window_days
}

locals {
  # amqps://b-….mq.<region>.amazonaws.com:5671 → amqps://user:password@b-…:5671/ (default vhost "/")
  amqp_endpoint = var.enable_amazon_mq ? aws_mq_broker.rabbitmq[0].instances[0].endpoints[0] : null
  amqp_url = (
    var.enable_amazon_mq
    ? "${replace(local.amqp_endpoint, "amqps://", "amqps://${var.mq_username}:${random_password.mq[0].result}@")}/"
    : null
  )
}

resource "aws_secretsmanager_secret_version" "amqp" {
  count = var.enable_amazon_mq ? 1 : 0

  secret_id = aws_secretsmanager_secret.amqp[0].id
  secret_string = jsonencode({
    username = var.mq_username
    password = random_password.mq[0].result
    endpoint = local.amqp_endpoint
    url      = local.amqp_url
  })
}
