{{/* Chart name. */}}
{{- define "capdb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name; also the StatefulSet name, so pods are <fullname>-<ordinal>. A release
named like the chart (`capdb`) gives `capdb`, the names of deploy/kubernetes/.
*/}}
{{- define "capdb.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The headless Service giving each pod its DNS name. */}}
{{- define "capdb.peersService" -}}
{{- printf "%s-peers" (include "capdb.fullname" .) -}}
{{- end -}}

{{- define "capdb.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "capdb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "capdb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "capdb.labels" -}}
{{ include "capdb.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "capdb.chart" . }}
{{- end -}}

{{- define "capdb.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "capdb.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "capdb.secretName" -}}
{{- default (printf "%s-auth" (include "capdb.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "capdb.secretKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKey }}{{- else -}}password{{- end -}}
{{- end -}}

{{/* Cluster-scoped names must be unique across namespaces and releases. */}}
{{- define "capdb.clusterRoleName" -}}
{{- printf "%s-%s-node-reader" .Release.Namespace (include "capdb.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* DNS name (without port) of the pod with ordinal $i; $(POD_NAMESPACE) is expanded by the kubelet. */}}
{{- define "capdb.podHost" -}}
{{- $root := index . 0 -}}{{- $i := index . 1 -}}
{{- printf "%s-%d.%s.$(POD_NAMESPACE).svc.%s" (include "capdb.fullname" $root) (int $i) (include "capdb.peersService" $root) $root.Values.clusterDomain -}}
{{- end -}}

{{/*
--initial-cluster: the founding members, ids 1..n for ordinals 0..n-1, n = min(replicaCount, 3).
Pods with a higher ordinal are not listed and join through these addresses.
*/}}
{{- define "capdb.initialCluster" -}}
{{- $n := min (int .Values.replicaCount) 3 | int -}}
{{- $members := list -}}
{{- range $i := until $n -}}
{{- $members = append $members (printf "%d=%s:%d" (add1 $i) (include "capdb.podHost" (list $ $i)) (int $.Values.ports.peer)) -}}
{{- end -}}
{{- join "," $members -}}
{{- end -}}

{{- define "capdb.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion (toString .Values.image.tag)) -}}
{{- end -}}
