{{- define "envctl.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "envctl.labels" -}}
app.kubernetes.io/name: envctl
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "envctl.selectorLabels" -}}
app.kubernetes.io/name: envctl
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "envctl.verbs.manage" -}}
["get", "list", "watch", "create", "update", "patch", "delete"]
{{- end -}}

{{- define "envctl.environmentdClusterRole" -}}
{{- printf "%s-environmentd" (include "envctl.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
