{{/* The chart's name, or nameOverride. */}}
{{- define "pgrelief.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The objects' name: <release>-<name>, or the release's name when it already holds it. */}}
{{- define "pgrelief.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "pgrelief.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pgrelief.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgrelief.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pgrelief.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "pgrelief.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "pgrelief.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pgrelief.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The watched namespaces, one per line: watch.namespaces, or the release's namespace. */}}
{{- define "pgrelief.namespaces" -}}
{{- $namespaces := .Values.watch.namespaces | default (list .Release.Namespace) }}
{{- range $namespaces | uniq }}
{{ . }}
{{- end }}
{{- end }}

{{/*
The RBAC rules, the same for a Role (per watched namespace) and a ClusterRole. Each rule is
one thing the operator does, found by running it under no rights and reading the 403s;
tests/kube/test_chart_rbac.py runs it under exactly these rules and fails on any 403.
*/}}
{{- define "pgrelief.rules" -}}
# Watch ConnectionPolicies; kopf patches its finalizer and pgrelief.dev/ annotations on them.
- apiGroups: [pgrelief.dev]
  resources: [connectionpolicies]
  verbs: [list, watch, patch]
# The status is pgrelief's memory: conditions, counters, the hourly budget, the originals.
- apiGroups: [pgrelief.dev]
  resources: [connectionpolicies/status]
  verbs: [patch]
{{- if .Values.rbac.pgbouncer }}
# PgBouncer objects are owned by their policy with blockOwnerDeletion, which (with the
# OwnerReferencesPermissionEnforcement admission plugin) needs update on the owner's finalizers.
- apiGroups: [pgrelief.dev]
  resources: [connectionpolicies/finalizers]
  verbs: [update]
{{- end }}
# The audit: pgrelief's Events (created, then their count patched) and kopf's own.
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
# The database login named by spec.postgres.credentialsSecret, read at every reconnect.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
  {{- with .Values.rbac.secretNames }}
  resourceNames: {{ toJson . }}
  {{- end }}
{{- if .Values.peering.enabled }}
# Replicas see each other in the peering object; only the highest priority acts.
- apiGroups: [kopf.dev]
  resources: [{{ if .Values.watch.allNamespaces }}clusterkopfpeerings{{ else }}kopfpeerings{{ end }}]
  verbs: [list, watch, patch]
{{- end }}
{{- if .Values.rbac.pgbouncer }}
# spec.pgbouncer: the pooler's Deployment, ConfigMap, Service and PodDisruptionBudget,
# server-side applied (patch, and create when new), read, watched and deleted.
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
{{- end }}
{{- end }}

{{/*
Cluster-scoped reads kopf makes whatever it watches: the CRDs (to notice a CRD installed or
changed after it started) and, unless it watches every namespace, the namespaces. Without
them kopf retries each 403 for about a minute before serving anything, then carries on blind.
*/}}
{{- define "pgrelief.observerRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if not .Values.watch.allNamespaces }}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- end }}
