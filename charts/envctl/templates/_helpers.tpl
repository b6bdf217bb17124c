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

{{- /*
This release's instance name: `instance` when set; else the one its Deployment already runs
as (an upgrade never renames an instance, which would orphan its environments); else
`<release namespace>-<release name>` (shortened with a hash past 40 characters), which no two
releases share.
*/ -}}
{{- define "envctl.instance" -}}
{{- if .Values.instance -}}
{{- .Values.instance -}}
{{- else -}}
{{- $kept := "" -}}
{{- $deployment := lookup "apps/v1" "Deployment" .Release.Namespace (include "envctl.fullname" .) -}}
{{- if $deployment -}}
{{- range (index $deployment.spec.template.spec.containers 0).env -}}
{{- if eq .name "ENVCTL_INSTANCE" -}}{{- $kept = .value -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- if $kept -}}
{{- $kept -}}
{{- else -}}
{{- $base := printf "%s-%s" .Release.Namespace .Release.Name -}}
{{- if le (len $base) 40 -}}
{{- $base -}}
{{- else -}}
{{- printf "%s-%s" ($base | trunc 31 | trimSuffix "-") ($base | sha256sum | trunc 8) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* The ClusterRole envctl binds in each of its environments (their TLS Secrets). */ -}}
{{- define "envctl.inEnvironmentsClusterRole" -}}
{{- printf "%s-in-environments" (include "envctl.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- /* The cluster-wide claim on the instance name (templates/claim.yaml). */ -}}
{{- define "envctl.claim" -}}
{{- printf "envctl-instance-%s" (include "envctl.instance" .) -}}
{{- end -}}

{{- /*
What both admission policies hold a write to, whoever makes it (envctl's ServiceAccount, or an
environment's environmentd): the shape of StatefulSets (their pod templates and volume
claims), Services and ServiceAccounts. Variables first, then validations; each refusal says
which rule it is.
*/ -}}
{{- define "envctl.shapeVariables" -}}
- name: writesStatefulSet
  expression: "request.resource.group == 'apps' && request.resource.resource == 'statefulsets' && request.operation != 'DELETE'"
- name: writesService
  expression: "request.resource.group == '' && request.resource.resource == 'services' && request.operation != 'DELETE'"
- name: writesServiceAccount
  expression: "request.resource.group == '' && request.resource.resource == 'serviceaccounts' && request.operation != 'DELETE'"
- name: podSpec
  expression: "object.spec.template.spec"
- name: containers
  expression: "variables.podSpec.containers + variables.podSpec.?initContainers.orValue([])"
- name: podServiceAccount
  expression: "variables.podSpec.?serviceAccountName.orValue(variables.podSpec.?serviceAccount.orValue(''))"
{{- end -}}

{{- define "envctl.shapeValidations" -}}
{{- $p := .Values.admissionPolicy -}}
- expression: >-
    !variables.writesStatefulSet || (!variables.podSpec.?hostNetwork.orValue(false)
    && !variables.podSpec.?hostPID.orValue(false) && !variables.podSpec.?hostIPC.orValue(false))
  message: "host namespaces: a pod template may not share the node's network, PID or IPC namespace (hostNetwork, hostPID, hostIPC)"
- expression: >-
    !variables.writesStatefulSet
    || variables.containers.all(c, c.?ports.orValue([]).all(p, p.?hostPort.orValue(0) == 0))
  message: "host ports: no container may take a port of the node (hostPort)"
- expression: >-
    !variables.writesStatefulSet || variables.podSpec.?volumes.orValue([]).all(v,
    has(v.emptyDir) || has(v.configMap) || has(v.secret) || has(v.projected)
    || has(v.downwardAPI) || has(v.persistentVolumeClaim) || has(v.ephemeral))
  message: "volumes: a pod template may mount only emptyDir, configMap, secret, projected, downwardAPI, persistentVolumeClaim and ephemeral volumes (no hostPath, no other volume type)"
- expression: >-
    !variables.writesStatefulSet || variables.containers.all(c,
    !c.?securityContext.?privileged.orValue(false)
    && c.?securityContext.?capabilities.?add.orValue([]).size() == 0)
  message: "privileged: no container may be privileged or add capabilities"
- expression: >-
    !variables.writesStatefulSet || variables.containers.all(c,
    c.?securityContext.?allowPrivilegeEscalation.orValue(true) == false)
  message: "privilege escalation: every container sets allowPrivilegeEscalation: false"
- expression: >-
    !variables.writesStatefulSet || variables.containers.all(c,
    c.?securityContext.?runAsNonRoot.orValue(variables.podSpec.?securityContext.?runAsNonRoot.orValue(false))
    && c.?securityContext.?runAsUser.orValue(variables.podSpec.?securityContext.?runAsUser.orValue(1)) != 0)
  message: "root: every container runs as non-root (runAsNonRoot: true, runAsUser not 0)"
- expression: >-
    !variables.writesStatefulSet || variables.containers.all(c,
    c.?securityContext.?seccompProfile.?type.orValue(variables.podSpec.?securityContext.?seccompProfile.?type.orValue('')) in ['RuntimeDefault', 'Localhost'])
  message: "seccomp: every container runs under the RuntimeDefault (or a Localhost) seccomp profile"
- expression: "!variables.writesStatefulSet || variables.podSpec.?nodeName.orValue('') == ''"
  message: "nodeName: a pod template may not pick its node (nodeName); the scheduler places it"
- expression: >-
    !variables.writesStatefulSet
    || variables.podSpec.?tolerations.orValue([]).all(t, t.?key.orValue('') != '')
  message: "tolerations: every toleration names a taint key (one without a key tolerates every taint)"
- expression: >-
    !variables.writesStatefulSet || variables.podSpec.?priorityClassName.orValue('') == ''
    || variables.podSpec.priorityClassName in {{ $p.allowedPriorityClasses | toJson }}
  message: {{ printf "priorityClassName: only these priority classes are allowed: %s" (ternary "none" (join ", " $p.allowedPriorityClasses) (empty $p.allowedPriorityClasses)) | quote }}
- expression: >-
    !variables.writesStatefulSet
    || variables.podServiceAccount in (object.metadata.name == 'environmentd' ? ['environmentd'] : ['', 'default'])
  message: "serviceAccountName: only the StatefulSet environmentd runs as the ServiceAccount environmentd; every other pod template runs as its namespace's default"
- expression: >-
    !variables.writesStatefulSet || object.spec.?volumeClaimTemplates.orValue([]).all(t,
    t.?spec.?volumeName.orValue('') == ''
    && (!has(t.spec) || !has(t.spec.storageClassName) || t.spec.storageClassName in {{ $p.storageClasses | toJson }}))
  message: {{ printf "volumeClaimTemplates: a claim may not name a PersistentVolume (volumeName), and its storageClassName is left out (the default class) or one of: %s" (ternary "none" (join ", " $p.storageClasses) (empty $p.storageClasses)) | quote }}
- expression: "!variables.writesService || object.spec.?type.orValue('ClusterIP') == 'ClusterIP'"
  message: "Service type: only ClusterIP or headless Services (no NodePort, LoadBalancer or ExternalName)"
- expression: "!variables.writesService || object.spec.?externalIPs.orValue([]).size() == 0"
  message: "externalIPs: a Service may not claim external IPs (CVE-2020-8554)"
{{- range $key := list "eks.amazonaws.com/role-arn" "iam.gke.io/gcp-service-account" "azure.workload.identity/client-id" }}
{{- $allowed := get $p.allowedWorkloadIdentities $key }}
- expression: >-
    !variables.writesServiceAccount || !({{ $key | squote }} in object.metadata.?annotations.orValue({}))
    {{- if $allowed }} || object.metadata.annotations[{{ $key | squote }}] == {{ $allowed | squote }}{{ end }}
  message: {{ printf "workload identity: a ServiceAccount may not carry %s%s" $key (ternary (printf " other than %s" $allowed) "" (not (empty $allowed))) | quote }}
{{- end }}
{{- end -}}
