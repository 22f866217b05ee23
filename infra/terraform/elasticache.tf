# Optional ElastiCache for Redis (enable_elasticache): a replication group in the private subnets,
# encrypted at rest and in transit (so the URL is rediss://), with an AUTH token generated here and
# kept in Secrets Manager. Cluster mode stays off: imgpipe uses Lua scripts over several keys of one
# job and PUBLISH/SUBSCRIBE, which want a single shard. redis_multi_az adds a replica in another zone
# with automatic failover. When disabled, the chart's bundled Redis is used instead.
#
# Eviction: every imgpipe key has a TTL, and the default parameter groups (default.redis7) use
# maxmemory-policy volatile-lru, which under memory pressure silently evicts any key with a TTL:
# job records included, so a job answered 202 would vanish. The parameter group below sets
# noeviction: a full Redis refuses writes (new jobs get a 503) and keeps the accepted ones.

resource "aws_elasticache_subnet_group" "redis" {
  count = var.enable_elasticache ? 1 : 0

  name        = "${var.name}-redis"
  description = "imgpipe Redis: private subnets"
  subnet_ids  = module.vpc.private_subnets
}

resource "aws_security_group" "redis" {
  count = var.enable_elasticache ? 1 : 0

  name        = "${var.name}-redis"
  description = "ElastiCache for Redis: TLS from the EKS nodes only"
  vpc_id      = module.vpc.vpc_id

  tags = {
    Name = "${var.name}-redis"
  }
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_nodes" {
  count = var.enable_elasticache ? 1 : 0

  security_group_id            = aws_security_group.redis[0].id
  description                  = "Redis (TLS) from the EKS nodes and pods"
  referenced_security_group_id = module.eks.node_security_group_id
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
}

locals {
  # ElastiCache names the parameter group families redis6.x (Redis 6) and redis7 (Redis 7).
  redis_major_version = split(".", var.redis_engine_version)[0]
  redis_family        = local.redis_major_version == "6" ? "redis6.x" : "redis${local.redis_major_version}"
}

resource "aws_elasticache_parameter_group" "redis" {
  count = var.enable_elasticache && var.redis_parameter_group_name == null ? 1 : 0

  # The family is in the name so that an engine upgrade creates the new group before the old one
  # is deleted (create_before_destroy; names are unique).
  name        = "${var.name}-redis-${replace(local.redis_family, ".", "-")}"
  family      = local.redis_family
  description = "imgpipe: maxmemory-policy noeviction (every key has a TTL; volatile-lru would evict job records)"

  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "random_password" "redis" {
  count = var.enable_elasticache ? 1 : 0

  # AUTH tokens: 16-128 printable characters; alphanumerics keep the URL valid as it is.
  length  = 64
  special = false
}

resource "aws_elasticache_replication_group" "redis" {
  count = var.enable_elasticache ? 1 : 0

  replication_group_id = "${var.name}-redis"
  description          = "imgpipe job records, idempotency keys and status events"

  engine               = "redis"
  engine_version       = var.redis_engine_version
  parameter_group_name = coalesce(var.redis_parameter_group_name, one(aws_elasticache_parameter_group.redis[*].name))
  node_type            = var.redis_node_type
  port                 = 6379

  num_cache_clusters         = var.redis_multi_az ? 2 : 1
  automatic_failover_enabled = var.redis_multi_az
  multi_az_enabled           = var.redis_multi_az

  subnet_group_name  = aws_elasticache_subnet_group.redis[0].name
  security_group_ids = [aws_security_group.redis[0].id]

  at_rest_encryption_enabled = true
  kms_key_id                 = var.secrets_kms_key_arn
  transit_encryption_enabled = true
  auth_token                 = random_password.redis[0].result

  auto_minor_version_upgrade = true
  maintenance_window         = "sun:04:00-sun:05:00"
  snapshot_retention_limit   = var.redis_snapshot_retention_days
  snapshot_window            = "02:00-03:00"
  apply_immediately          = false
}

resource "aws_secretsmanager_secret" "redis" {
  count = var.enable_elasticache ? 1 : 0

  name                    = "${var.name}/redis"
  description             = "imgpipe: ElastiCache for Redis AUTH token and IMGPIPE_REDIS_URL"
  kms_key_id              = var.secrets_kms_key_arn
  recovery_window_in_days = var.secrets_recovery_window_days
}

locals {
  redis_host = var.enable_elasticache ? aws_elasticache_replication_group.redis[0].primary_endpoint_address : null
  redis_url = (
    var.enable_elasticache
    ? "rediss://:${random_password.redis[0].result}@${local.redis_host}:6379/0"
    : null
  )
}

resource "aws_secretsmanager_secret_version" "redis" {
  count = var.enable_elasticache ? 1 : 0

  secret_id = aws_secretsmanager_secret.redis[0].id
  secret_string = jsonencode({
    auth_token = random_password.redis[0].result
    host       = local.redis_host
    port       = 6379
    url        = local.redis_url
  })
}
