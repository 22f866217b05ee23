{{/*
Names, labels and shared building blocks. Component templates call the helpers with
`(dict "root" $ "component" "api")`.
*/}}

{{/* The chart name. */}}
{{- define "imgpipe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release-wide name prefix, at most 63 characters. */}}
{{- define "imgpipe.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of one component's resources: <fullname>-<component>. */}}
{{- define "imgpipe.componentName" -}}
{{- printf "%s-%s" (include "imgpipe.fullname" .root | trunc 50 | trimSuffix "-") .component -}}
{{- end -}}

{{/* chart label value: name-version. */}}
{{- define "imgpipe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "imgpipe.labels" -}}
helm.sh/chart: {{ include "imgpipe.chart" . }}
app.kubernetes.io/name: {{ include "imgpipe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: imgpipe
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of one component's resources. */}}
{{- define "imgpipe.componentLabels" -}}
{{ include "imgpipe.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Release-wide selector labels. */}}
{{- define "imgpipe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imgpipe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one component (immutable: never add to them). */}}
{{- define "imgpipe.componentSelectorLabels" -}}
{{ include "imgpipe.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
metadata.annotations (indented for a top-level metadata, with a leading newline) from
commonAnnotations plus an optional extra map (.extra); nothing when both are empty.
*/}}
{{- define "imgpipe.annotations" -}}
{{- $all := merge (deepCopy (default dict .extra)) (deepCopy (default dict .root.Values.commonAnnotations)) -}}
{{- with $all }}
  annotations:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}

{{/* The ServiceAccount name of one component. */}}
{{- define "imgpipe.serviceAccountName" -}}
{{- $sa := (index .root.Values .component).serviceAccount -}}
{{- if $sa.create -}}
{{- default (include "imgpipe.componentName" .) $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end -}}

{{/* The image reference of one component: registry/repository:tag[@digest]. */}}
{{- define "imgpipe.image" -}}
{{- $img := (index .root.Values .component).image -}}
{{- $tag := default .root.Chart.AppVersion $img.tag | toString -}}
{{- $ref := $img.repository -}}
{{- if $img.registry }}{{ $ref = printf "%s/%s" $img.registry $img.repository }}{{ end -}}
{{- if $img.digest -}}
{{- printf "%s:%s@%s" $ref $tag $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref $tag -}}
{{- end -}}
{{- end -}}

{{/* Names of the ConfigMap and of the Secret the pods load. */}}
{{- define "imgpipe.configMapName" -}}
{{- printf "%s-config" (include "imgpipe.fullname" .) -}}
{{- end -}}

{{- define "imgpipe.secretName" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.existingSecret -}}
{{- else -}}
{{- printf "%s-secret" (include "imgpipe.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
Full name of a bundled Bitnami subchart (their common.names.fullname rule), for in-release hosts.
Call with (dict "root" $ "chart" "rabbitmq").
*/}}
{{- define "imgpipe.dependencyFullname" -}}
{{- $values := index .root.Values .chart -}}
{{- if $values.fullnameOverride -}}
{{- $values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .chart $values.nameOverride -}}
{{- if contains $name .root.Release.Name -}}
{{- .root.Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .root.Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* In-cluster DNS suffix of the release namespace. */}}
{{- define "imgpipe.svcDomain" -}}
{{- printf "%s.svc" .Release.Namespace -}}
{{- end -}}

{{/* IMGPIPE_AMQP_URL: the bundled RabbitMQ, or secrets.amqpUrl. */}}
{{- define "imgpipe.amqpUrl" -}}
{{- if .Values.rabbitmq.enabled -}}
{{- $password := required "rabbitmq.auth.password is required when rabbitmq.enabled (the AMQP URL is built from it)" .Values.rabbitmq.auth.password -}}
{{- printf "amqp://%s:%s@%s.%s:5672/" (include "imgpipe.urlEscape" .Values.rabbitmq.auth.username) (include "imgpipe.urlEscape" $password) (include "imgpipe.dependencyFullname" (dict "root" . "chart" "rabbitmq")) (include "imgpipe.svcDomain" .) -}}
{{- else -}}
{{- required "secrets.amqpUrl is required (or secrets.existingSecret, or rabbitmq.enabled=true)" .Values.secrets.amqpUrl -}}
{{- end -}}
{{- end -}}

{{/* IMGPIPE_REDIS_URL: the bundled Redis master, or secrets.redisUrl. */}}
{{- define "imgpipe.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- $password := required "redis.auth.password is required when redis.enabled (the Redis URL is built from it)" .Values.redis.auth.password -}}
{{- printf "redis://:%s@%s-master.%s:6379/0" (include "imgpipe.urlEscape" $password) (include "imgpipe.dependencyFullname" (dict "root" . "chart" "redis")) (include "imgpipe.svcDomain" .) -}}
{{- else -}}
{{- required "secrets.redisUrl is required (or secrets.existingSecret, or redis.enabled=true)" .Values.secrets.redisUrl -}}
{{- end -}}
{{- end -}}

{{/* IMGPIPE_S3_ENDPOINT_URL: the bundled MinIO, or config.s3.endpointUrl. */}}
{{- define "imgpipe.s3EndpointUrl" -}}
{{- if .Values.minio.enabled -}}
{{- printf "http://%s.%s:9000" (include "imgpipe.dependencyFullname" (dict "root" . "chart" "minio")) (include "imgpipe.svcDomain" .) -}}
{{- else -}}
{{- .Values.config.s3.endpointUrl -}}
{{- end -}}
{{- end -}}

{{/*
IMGPIPE_JWT_ALGORITHMS as a JSON list: config.jwt.algorithms, or the services' default for the key
source (HS256 with the shared secret, RS256 with a JWKS). Refuses a mix of key sources, as the
services do (values.schema.json already does; this holds with --skip-schema-validation too).
*/}}
{{- define "imgpipe.jwtAlgorithms" -}}
{{- $jwt := .Values.config.jwt -}}
{{- $hmac := list "HS256" "HS384" "HS512" -}}
{{- $algs := $jwt.algorithms | default (ternary (list "RS256") (list "HS256") (not (empty $jwt.jwksUrl))) -}}
{{- range $algs -}}
{{- if and $jwt.jwksUrl (has . $hmac) -}}
{{- fail (printf "config.jwt.algorithms: %s cannot be used with config.jwt.jwksUrl (HS* needs the shared secret; use RS256/RS384/RS512/ES256/ES384/PS256)" .) -}}
{{- else if and (not $jwt.jwksUrl) (not (has . $hmac)) -}}
{{- fail (printf "config.jwt.algorithms: %s needs config.jwt.jwksUrl (public keys); without it only HS256/HS384/HS512" .) -}}
{{- end -}}
{{- end -}}
{{- $algs | toJson -}}
{{- end -}}

{{/*
The worker's autoscaler: `keda`, `hpa` or `none`. `auto` is `keda` where the cluster serves
keda.sh/v1alpha1 (KEDA installed; `.Capabilities`, known during `helm install`/`upgrade`), and
`hpa` otherwise, so that a default install works on a cluster without KEDA (a ScaledObject there
fails the whole install on the unknown kind).
*/}}
{{- define "imgpipe.workerAutoscaler" -}}
{{- $type := toString .Values.worker.autoscaling.type -}}
{{- if eq $type "auto" -}}
{{- ternary "keda" "hpa" (.Capabilities.APIVersions.Has "keda.sh/v1alpha1") -}}
{{- else -}}
{{- $type -}}
{{- end -}}
{{- end -}}

{{/*
A value of `config.extra` as the variable's text. Numbers from a values file
reach the template as float64, which prints 1000000 as "1e+06" (an integer setting refuses that):
whole numbers are printed as integers, other values as they are.
*/}}
{{- define "imgpipe.envValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}

{{/* The queue the KEDA trigger watches. */}}
{{- define "imgpipe.jobsQueue" -}}
{{- default (printf "%s.jobs" .Values.config.namespace) .Values.worker.autoscaling.keda.queueName -}}
{{- end -}}

{{/*
Whether an operator-backed resource renders: a value of `auto` follows the cluster's API
(`.Capabilities`), true/false force it. Call with (dict "root" $ "value" <v> "api" "<group/version>").
Prints "true" or nothing.
*/}}
{{- define "imgpipe.crdEnabled" -}}
{{- if eq (toString .value) "auto" -}}
{{- if .root.Capabilities.APIVersions.Has .api }}true{{ end -}}
{{- else if eq (toString .value) "true" -}}
true
{{- end -}}
{{- end -}}

{{/* An HTTP probe on the `http` port. Call with (dict "probe" <values> "path" "/healthz"). */}}
{{- define "imgpipe.probe" -}}
httpGet:
  path: {{ .path }}
  port: http
initialDelaySeconds: {{ .probe.initialDelaySeconds }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
successThreshold: {{ .probe.successThreshold }}
{{- end -}}

{{/* A PodDisruptionBudget's minAvailable / maxUnavailable: maxUnavailable wins when set. */}}
{{- define "imgpipe.pdbSpec" -}}
{{- $pdb := (index .root.Values .component).pdb -}}
{{- if ne (toString $pdb.maxUnavailable) "" -}}
maxUnavailable: {{ $pdb.maxUnavailable }}
{{- else if ne (toString $pdb.minAvailable) "" -}}
minAvailable: {{ $pdb.minAvailable }}
{{- else -}}
{{- fail (printf "%s.pdb: set minAvailable or maxUnavailable" .component) -}}
{{- end -}}
{{- end -}}

{{/* Percent-encode a URL userinfo part (urlquery writes a space as "+", which userinfo keeps). */}}
{{- define "imgpipe.urlEscape" -}}
{{- urlquery . | replace "+" "%20" -}}
{{- end -}}
