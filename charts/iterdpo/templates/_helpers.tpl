{{/* The chart name, or nameOverride. */}}
{{- define "iterdpo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-iterdpo" (or the release name if it contains the chart name), or fullnameOverride. */}}
{{- define "iterdpo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "iterdpo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the chart. */}}
{{- define "iterdpo.labels" -}}
helm.sh/chart: {{ include "iterdpo.chart" . }}
{{ include "iterdpo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The operator pod's selector. component=operator keeps it apart from the runs'
children, which carry app.kubernetes.io/name=iterdpo too. */}}
{{- define "iterdpo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "iterdpo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "iterdpo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "iterdpo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The watched namespaces as a JSON list ([] when watching all namespaces). */}}
{{- define "iterdpo.watchNamespaces" -}}
{{- if .Values.watch.allNamespaces }}
{{- if .Values.watch.namespaces }}
{{- fail "watch: set either watch.namespaces or watch.allNamespaces=true, not both" }}
{{- end }}
{{- list | toJson }}
{{- else }}
{{- default (list .Release.Namespace) .Values.watch.namespaces | uniq | toJson }}
{{- end }}
{{- end }}

{{- define "iterdpo.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{/*
The operator's rules: exactly the resources and verbs operator/kube.py, operator/handlers.py
and kopf use in a watched namespace (a Role there, or a ClusterRole with -A). Checked by
tests/cluster/test_chart_install.py, which runs the operator with only these rules and
removes them one at a time.
*/}}
{{- define "iterdpo.operatorRules" -}}
# The runs. get: kube.py read_run (each reconcile pass reads the run fresh).
# list, watch: kopf's watch of the runs (create/update/resume handlers, the timer).
# patch: kopf's bookkeeping, its iterdpo.io/* annotations (handlers.configure) and its
#   finalizer (kopf puts one on each run because of the timer; it removes it on delete).
- apiGroups: ["iterdpo.io"]
  resources: ["iterativedporuns"]
  verbs: ["get", "list", "watch", "patch"]
# update: kube.py write_status, a PUT of the status subresource under the resourceVersion
#   that was read (optimistic concurrency; a 409 makes the operator decide again).
- apiGroups: ["iterdpo.io"]
  resources: ["iterativedporuns/status"]
  verbs: ["update"]
# update: every child has an ownerReference to its run with blockOwnerDeletion: true
#   (builders.owner_reference). Where the OwnerReferencesPermissionEnforcement admission
#   plugin is on (e.g. OpenShift), creating such a child needs update on the owner's
#   finalizers. Plain Kubernetes does not check it.
- apiGroups: ["iterdpo.io"]
  resources: ["iterativedporuns/finalizers"]
  verbs: ["update"]
# Generate, Score and (launcher: job) Train Jobs. get: kube.py observe (_get of the
#   current child). create: kube.py create (a 409 means it exists). patch: suspend and
#   unsuspend (a merge patch of spec.suspend). list, watch: kopf's on.event watch of the
#   Jobs labelled iterdpo.io/run, which wakes a reconcile when a child changes.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The reward server Deployment. create: kube.py create. get, patch: kube.py scale reads it
#   and patches spec.replicas (not the scale subresource). list, watch: kopf's on.event.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
# get: kube.py server_available (read_namespaced_deployment_status: is it Available).
- apiGroups: ["apps"]
  resources: ["deployments/status"]
  verbs: ["get"]
# Train with launcher: pytorchjob (Kubeflow training operator v1): as for Jobs (patch =
#   spec.runPolicy.suspend). Harmless where Kubeflow is not installed.
- apiGroups: ["kubeflow.org"]
  resources: ["pytorchjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The reward Service: kube.py create only (never read, never changed; a 409 means it exists).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create"]
# The run's spec ConfigMap (the run file the pods read): kube.py ensure creates it, and
#   get + patch replace its data when the spec changed (spec.iterations raised).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
# create: kube.py create of <run>-reward-token, the reward server's bearer token, made
#   once with a random value unless the run names its own (spec.kubernetes.rewardTokenSecret).
# get: kube.py missing_references, whether each Secret the spec names (hubTokenSecret,
#   rewardTokenSecret) exists before a child is created; it asks for the metadata only
#   (PartialObjectMetadata), never reads a value (pods get them through secretKeyRefs).
#   No list/watch on Secrets.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create", "get"]
# get: kube.py missing_references, whether spec.kubernetes.volume.claimName exists before
#   a child is created (metadata only). Never created, changed or listed.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
# create: kube.py create of the run's NetworkPolicy <run>-reward (only with
#   spec.kubernetes.rewardNetworkPolicy: true).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create"]
# list: kube.py _pods, the stage summaries and failure details from the pods'
#   termination messages (selected by job-name or the PyTorchJob master's labels), and
#   kube.py pod_problem, why a running attempt's or the reward server's pods cannot start.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# create: kube.py event, the run's Events (StageStarted, Succeeded, ...). Best effort:
#   without it the runs still work, without Events, and the operator logs a warning.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
