# Cluster add-ons installed with Helm: KEDA (scales the worker on queue depth through the chart's
# ScaledObject) and ingress-nginx (the Ingress controller, behind an AWS Network Load Balancer).
# Both are pinned to a chart version and wait for the managed node group, which runs their pods.

resource "helm_release" "keda" {
  count = var.enable_keda ? 1 : 0

  name             = "keda"
  repository       = "https://kedacore.github.io/charts"
  chart            = "keda"
  version          = var.keda_chart_version
  namespace        = "keda"
  create_namespace = true

  atomic          = true
  cleanup_on_fail = true
  timeout         = 600

  depends_on = [module.eks]
}

resource "helm_release" "ingress_nginx" {
  count = var.enable_ingress_nginx ? 1 : 0

  name             = "ingress-nginx"
  repository       = "https://kubernetes.github.io/ingress-nginx"
  chart            = "ingress-nginx"
  version          = var.ingress_nginx_chart_version
  namespace        = "ingress-nginx"
  create_namespace = true

  atomic          = true
  cleanup_on_fail = true
  timeout         = 900

  values = [yamlencode({
    controller = {
      replicaCount = 2
      ingressClassResource = {
        name    = var.ingress_class_name
        default = false
      }
      service = {
        annotations = {
          # An internet-facing NLB created by the in-tree service controller; no extra IAM needed.
          "service.beta.kubernetes.io/aws-load-balancer-type"   = "nlb"
          "service.beta.kubernetes.io/aws-load-balancer-scheme" = "internet-facing"
        }
      }
      config = {
        # Server-Sent Events (status service): no buffering, long-lived connections.
        "proxy-buffering"    = "off"
        "proxy-read-timeout" = "3600"
        "proxy-send-timeout" = "3600"
        # The default access log format logs "$request", the request line with its query string,
        # and event-stream clients (EventSource cannot send headers) put their JWT in it:
        # GET /jobs/{id}/events?access_token=<JWT>. The same fields as the default, with the path
        # ($uri, no query) in place of $request.
        "log-format-upstream" = join(" ", [
          "$remote_addr - $remote_user [$time_local]",
          "\"$request_method $uri $server_protocol\"",
          "$status $body_bytes_sent \"$http_referer\" \"$http_user_agent\"",
          "$request_length $request_time [$proxy_upstream_name] [$proxy_alternative_upstream_name]",
          "$upstream_addr $upstream_response_length $upstream_response_time $upstream_status $req_id",
        ])
      }
    }
  })]

  depends_on = [module.eks]
}
