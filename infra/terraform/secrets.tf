# Secrets the Helm release needs that AWS does not hand out: the JWT signing key, and the passwords
# of the chart's bundled RabbitMQ/Redis when the managed services are off. Generated once and kept
# in the Terraform state (which is why the state must be encrypted and access-controlled; see the
# README), so every `helm upgrade` gets the same values. They reach the cluster only through the
# sensitive `helm_secret_values` output.

resource "random_password" "jwt" {
  # IMGPIPE_JWT_SECRET: HS256 key, at least 32 characters outside local/test.
  length  = 64
  special = false
}

resource "random_password" "bundled_rabbitmq" {
  count = var.enable_amazon_mq ? 0 : 1

  length  = 32
  special = false
}

resource "random_password" "bundled_redis" {
  count = var.enable_elasticache ? 0 : 1

  length  = 32
  special = false
}
