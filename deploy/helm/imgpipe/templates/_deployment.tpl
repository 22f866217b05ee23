{{/*
The Deployment of one component. Call with (dict "root" $ "component" "api").
The component's values live under .Values.<component>.
*/}}
{{- define "imgpipe.deployment" -}}
{{- $root := .root -}}
{{- $c := .component -}}
{{- $v := index $root.Values $c -}}
{{- $ctx := dict "root" $root "component" $c -}}
{{- $a := default dict $v.autoscaling -}}
{{- $scaled := false -}}
{{- if and (hasKey $a "enabled") $a.enabled }}{{ $scaled = true }}{{ end -}}
{{- if and (hasKey $a "type") (ne $a.type "none") }}{{ $scaled = true }}{{ end -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "imgpipe.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "imgpipe.componentLabels" $ctx | nindent 4 }}
  {{- include "imgpipe.annotations" (dict "root" $root) }}
spec:
  {{- if not $scaled }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  {{- if $v.strategy }}
  strategy:
    {{- toYaml $v.strategy | nindent 4 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "imgpipe.componentSelectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "imgpipe.componentLabels" $ctx | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- if not $root.Values.secrets.existingSecret }}
        checksum/secret: {{ include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum }}
        {{- end }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "imgpipe.serviceAccountName" $ctx }}
      automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      containers:
        - name: {{ $c }}
          image: {{ include "imgpipe.image" $ctx | quote }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          {{- $command := $v.command }}
          {{- if not $command }}
          {{- $command = list (printf "imgpipe-%s" $c) "--port" (toString $v.containerPort) }}
          {{- end }}
          command:
            {{- toYaml $command | nindent 12 }}
          {{- with $v.extraArgs }}
          args:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - name: http
              containerPort: {{ $v.containerPort }}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: {{ include "imgpipe.configMapName" $root }}
            - secretRef:
                name: {{ include "imgpipe.secretName" $root }}
            {{- with $v.extraEnvFrom }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- with $v.extraEnv }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- if $v.startupProbe.enabled }}
          startupProbe:
            {{- include "imgpipe.probe" (dict "probe" $v.startupProbe "path" "/healthz") | nindent 12 }}
          {{- end }}
          {{- if $v.livenessProbe.enabled }}
          livenessProbe:
            {{- include "imgpipe.probe" (dict "probe" $v.livenessProbe "path" "/healthz") | nindent 12 }}
          {{- end }}
          {{- if $v.readinessProbe.enabled }}
          readinessProbe:
            {{- include "imgpipe.probe" (dict "probe" $v.readinessProbe "path" "/readyz") | nindent 12 }}
          {{- end }}
          {{- if and (hasKey $v "preStop") $v.preStop.enabled }}
          lifecycle:
            preStop:
              {{- if $v.preStop.nativeSleep }}
              sleep:
                seconds: {{ $v.preStop.sleepSeconds }}
              {{- else }}
              exec:
                command: ["sleep", {{ $v.preStop.sleepSeconds | toString | quote }}]
              {{- end }}
          {{- end }}
          {{- with $v.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- with $v.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            {{- with $root.Values.tmpVolume.medium }}
            medium: {{ . }}
            {{- end }}
            {{- with $root.Values.tmpVolume.sizeLimit }}
            sizeLimit: {{ . }}
            {{- end }}
        {{- with $v.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml $v.topologySpreadConstraints | nindent 8 }}
      {{- else if $root.Values.topologySpread.enabled }}
      topologySpreadConstraints:
        {{- range list "topology.kubernetes.io/zone" "kubernetes.io/hostname" }}
        - maxSkew: {{ $root.Values.topologySpread.maxSkew }}
          topologyKey: {{ . }}
          whenUnsatisfiable: {{ $root.Values.topologySpread.whenUnsatisfiable }}
          labelSelector:
            matchLabels:
              {{- include "imgpipe.componentSelectorLabels" $ctx | nindent 14 }}
          matchLabelKeys:
            - pod-template-hash
        {{- end }}
      {{- end }}
{{- end -}}

{{/* The Service of one component: port `http` → container port `http`. */}}
{{- define "imgpipe.service" -}}
{{- $root := .root -}}
{{- $v := index $root.Values .component -}}
{{- $ctx := dict "root" $root "component" .component -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "imgpipe.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "imgpipe.componentLabels" $ctx | nindent 4 }}
  {{- include "imgpipe.annotations" (dict "root" $root "extra" $v.service.annotations) }}
spec:
  type: {{ $v.service.type }}
  selector:
    {{- include "imgpipe.componentSelectorLabels" $ctx | nindent 4 }}
  ports:
    - name: http
      port: {{ $v.service.port }}
      targetPort: http
      protocol: TCP
{{- end -}}

{{/* The ServiceAccount of one component, with the IRSA role when irsaRoleArn is set. */}}
{{- define "imgpipe.serviceAccount" -}}
{{- $root := .root -}}
{{- $v := index $root.Values .component -}}
{{- $ctx := dict "root" $root "component" .component -}}
{{- $annotations := deepCopy (default dict $v.serviceAccount.annotations) -}}
{{- if $root.Values.irsaRoleArn -}}
{{- $annotations = merge $annotations (dict "eks.amazonaws.com/role-arn" $root.Values.irsaRoleArn) -}}
{{- end -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "imgpipe.serviceAccountName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "imgpipe.componentLabels" $ctx | nindent 4 }}
  {{- include "imgpipe.annotations" (dict "root" $root "extra" $annotations) }}
automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
{{- end -}}

{{/* The PodDisruptionBudget of one component. */}}
{{- define "imgpipe.pdb" -}}
{{- $root := .root -}}
{{- $ctx := dict "root" $root "component" .component -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "imgpipe.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "imgpipe.componentLabels" $ctx | nindent 4 }}
  {{- include "imgpipe.annotations" (dict "root" $root) }}
spec:
  {{- include "imgpipe.pdbSpec" $ctx | nindent 2 }}
  # A pod that is not ready protects nothing: during an outage of a shared dependency every pod of
  # a component can be unready at once, and the budget would then block every node drain.
  unhealthyPodEvictionPolicy: AlwaysAllow
  selector:
    matchLabels:
      {{- include "imgpipe.componentSelectorLabels" $ctx | nindent 6 }}
{{- end -}}

{{/* A CPU HorizontalPodAutoscaler (autoscaling/v2) for one component's Deployment. */}}
{{- define "imgpipe.hpa" -}}
{{- $root := .root -}}
{{- $a := (index $root.Values .component).autoscaling -}}
{{- $ctx := dict "root" $root "component" .component -}}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) -}}
{{- fail (printf "%s.autoscaling: minReplicas (%v) is above maxReplicas (%v)" .component $a.minReplicas $a.maxReplicas) -}}
{{- end -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "imgpipe.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "imgpipe.componentLabels" $ctx | nindent 4 }}
  {{- include "imgpipe.annotations" (dict "root" $root) }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "imgpipe.componentName" $ctx }}
  minReplicas: {{ max 1 (int $a.minReplicas) }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.targetCPUUtilizationPercentage }}
{{- end -}}
