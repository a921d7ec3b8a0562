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
The roads file as deployed: roadsYaml parsed, with the cluster's settings written into
defaults.kubernetes. Each key of .Values.kubernetes (plus namespace, service_account, s3_secret and
roads_config_map, which name this chart's objects) replaces the same key of the file's
defaults.kubernetes; keys the chart does not set are kept; a road's own `kubernetes:` still wins,
because the roads file merges `defaults` into each road when it is read. Returns YAML.
*/}}
{{- define "answersheet.roads" -}}
{{- $doc := fromYaml .Values.roadsYaml }}
{{- if hasKey $doc "Error" }}
{{- fail (printf "roadsYaml: not valid YAML: %s" $doc.Error) }}
{{- end }}
{{- if not (kindIs "slice" $doc.roads) }}
{{- fail "roadsYaml: expected a mapping with a 'roads' list (pass --set-file roadsYaml=dags/roads.yaml)" }}
{{- end }}
{{- $defaults := $doc.defaults | default dict }}
{{- if not (kindIs "map" $defaults) }}
{{- fail "roadsYaml: 'defaults' must be a mapping" }}
{{- end }}
{{- $kube := deepCopy ($defaults.kubernetes | default dict) }}
{{- range $key, $value := .Values.kubernetes }}
{{- $_ := set $kube $key (deepCopy $value) }}
{{- end }}
{{- range $role, $image := $kube.images }}
{{- if not $image.tag }}
{{- $_ := set $image "tag" $.Chart.AppVersion }}
{{- end }}
{{- end }}
{{- $_ := set $kube "namespace" .Release.Namespace }}
{{- $_ := set $kube "service_account" .Values.pipeline.serviceAccount.name }}
{{- $_ := set $kube "s3_secret" (include "answersheet.s3.secretName" .) }}
{{- $_ := set $kube "roads_config_map" .Values.roadsConfigMap.name }}
{{- $_ := set $defaults "kubernetes" $kube }}
{{- $_ := set $doc "defaults" $defaults }}
{{- toYaml $doc }}
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
