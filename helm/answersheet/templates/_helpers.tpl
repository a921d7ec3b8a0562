{{/* Labels on every object of this chart. */}}
{{- define "answersheet.labels" -}}
app.kubernetes.io/part-of: answersheet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* MinIO object names and selector labels. */}}
{{- define "answersheet.minio.fullname" -}}
{{- printf "%s-minio" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "answersheet.minio.selectorLabels" -}}
app.kubernetes.io/name: answersheet-minio
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "answersheet.minio.labels" -}}
{{ include "answersheet.labels" . }}
app.kubernetes.io/name: answersheet-minio
{{- end }}

{{- define "answersheet.minio.secretName" -}}
{{- .Values.minio.existingSecret | default (include "answersheet.minio.fullname" .) }}
{{- end }}

{{/* The Secret the stage pods read S3 settings from (envFrom): ours, or s3.existingSecret. */}}
{{- define "answersheet.s3.secretName" -}}
{{- .Values.s3.existingSecret | default .Values.s3.secretName }}
{{- end }}

{{/* S3 endpoint: s3.endpointUrl, else the bundled MinIO's Service, else empty (AWS S3). */}}
{{- define "answersheet.s3.endpointUrl" -}}
{{- if .Values.s3.endpointUrl }}
{{- .Values.s3.endpointUrl }}
{{- else if .Values.minio.enabled }}
{{- printf "http://%s.%s.svc.%s:%d" (include "answersheet.minio.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.minio.service.port) }}
{{- end }}
{{- end }}

{{/* image reference: repository@digest when a digest is pinned, else repository:tag. */}}
{{- define "answersheet.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{/*
A credential: the value given in values, else the one already stored in the live Secret (so upgrades
keep generated credentials), else a new random one. Args: ctx, secret, key, value, length.
*/}}
{{- define "answersheet.credential" -}}
{{- if .value }}
{{- .value }}
{{- else }}
{{- $live := lookup "v1" "Secret" .ctx.Release.Namespace .secret }}
{{- $data := dig "data" dict $live }}
{{- if hasKey $data .key }}
{{- index $data .key | b64dec }}
{{- else }}
{{- randAlphaNum (int .length) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Hardened security contexts for every container of this chart. */}}
{{- define "answersheet.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "answersheet.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The roads file (roadsYaml) parsed, for the bucket list; it is deployed unchanged. Fails with one line when it
is not YAML with a `roads` list. Returns YAML.
*/}}
{{- define "answersheet.roads" -}}
{{- $doc := fromYaml .Values.roadsYaml }}
{{- if hasKey $doc "Error" }}
{{- fail (printf "roadsYaml: not valid YAML: %s" $doc.Error) }}
{{- end }}
{{- if not (kindIs "slice" $doc.roads) }}
{{- fail "roadsYaml: expected a mapping with a 'roads' list (pass --set-file roadsYaml=dags/roads.yaml)" }}
{{- end }}
{{- if not (kindIs "map" ($doc.defaults | default dict)) }}
{{- fail "roadsYaml: 'defaults' must be a mapping" }}
{{- end }}
{{- toYaml $doc }}
{{- end }}

{{/*
One stage pod template for the KubernetesPodOperator (pod_template_file): args ctx, kind (preprocess |
detector), profile (its values). The container is `base`, the name the operator merges its command,
arguments, labels and env into (provider cncf-kubernetes: PodGenerator.reconcile_pods).
*/}}
{{- define "answersheet.stagePod" -}}
{{- $v := .ctx.Values.stagePods }}
{{- $image := deepCopy (index $v.images .kind) }}
{{- $_ := set $image "tag" ($image.tag | default .ctx.Chart.AppVersion) }}
{{- $gpu := .profile.gpu }}
apiVersion: v1
kind: Pod
metadata:
  name: answersheet-{{ .kind }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    app.kubernetes.io/name: answersheet
    app.kubernetes.io/part-of: answersheet
    answersheet.io/pod-profile: {{ printf "%s-%s" .kind .name }}
spec:
  serviceAccountName: {{ .ctx.Values.pipeline.serviceAccount.name }}
  automountServiceAccountToken: false
  restartPolicy: Never
  securityContext:
    runAsNonRoot: true
    runAsUser: {{ $v.runAsUser }}
    runAsGroup: {{ $v.runAsUser }}
    fsGroup: {{ $v.runAsUser }}
    seccompProfile:
      type: RuntimeDefault
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- if $gpu }}
  {{- with $gpu.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $gpu.products }}
  affinity:
    nodeAffinity:
      requiredDuringSchedulingIgnoredDuringExecution:
        nodeSelectorTerms:
          - matchExpressions:
              - key: nvidia.com/gpu.product
                operator: In
                values: {{- toYaml . | nindent 18 }}
  {{- end }}
  {{- with $gpu.tolerations }}
  tolerations: {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  containers:
    - name: base
      image: {{ include "answersheet.image" $image }}
      imagePullPolicy: {{ $image.pullPolicy }}
      resources:
        {{- with .profile.resources.requests }}
        requests: {{- toYaml . | nindent 10 }}
        {{- end }}
        limits:
          {{- with .profile.resources.limits }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
          {{- if $gpu }}
          {{ $gpu.resource }}: {{ $gpu.count | quote }}
          {{- end }}
      securityContext:
        {{- include "answersheet.containerSecurityContext" . | nindent 8 }}
      env:
        # the task log (KubernetesPodOperator get_logs) timestamps each line already
        - {name: ANSWERSHEET_LOG_TIMESTAMPS, value: "0"}
      envFrom:
        - secretRef:
            name: {{ include "answersheet.s3.secretName" .ctx }}
      volumeMounts:
        - {name: scratch, mountPath: /scratch}
        - {name: tmp, mountPath: /tmp}
        - {name: roads, mountPath: /etc/answersheet, readOnly: true}
  volumes:
    - name: scratch
      emptyDir: {sizeLimit: {{ $v.scratchSize }}}
    - name: tmp
      emptyDir: {sizeLimit: {{ $v.tmpSize }}}
    - name: roads
      configMap:
        name: {{ .ctx.Values.roadsConfigMap.name }}
        items:
          - {key: roads.yaml, path: roads.yaml}
{{- end }}

{{/* Space-separated, sorted, unique buckets of the roads file (defaults + every road) + extraBuckets. */}}
{{- define "answersheet.buckets" -}}
{{- $doc := include "answersheet.roads" . | fromYaml }}
{{- $default := $doc.defaults.bucket | default "answersheet" }}
{{- $buckets := list $default }}
{{- range $doc.roads }}
{{- $buckets = append $buckets (.bucket | default $default) }}
{{- end }}
{{- concat $buckets .Values.minio.bucketInit.extraBuckets | uniq | sortAlpha | join " " }}
{{- end }}
