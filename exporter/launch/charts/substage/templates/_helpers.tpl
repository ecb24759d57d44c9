{{/* Labels of every object of the release; `component` says which workload a pod belongs to. */}}
{{- define "substage.labels" -}}
app.kubernetes.io/name: ft-exporter
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
ft-exporter/sub-stage: {{ .root.Values.subStage }}
{{- end }}

{{- define "substage.selector" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Pod-level settings every pod shares: pull secret, DNS policy, the shared volume and /dev/shm. */}}
{{- define "substage.podCommon" -}}
{{- with .Values.pod.pullSecret }}
imagePullSecrets:
  - name: {{ . }}
{{- end }}
{{- with .Values.pod.dnsPolicy }}
dnsPolicy: {{ . }}
{{- end }}
volumes:
  - name: workspace
    {{- toYaml .Values.pod.volume | nindent 4 }}
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ .Values.pod.shmSize }}
{{- end }}

{{/* Container settings every container shares: image, working directory, environment (the pod's, then `env`:
this container's own), mounts. Called with (dict "root" $ "env" list). */}}
{{- define "substage.containerCommon" -}}
{{- $pod := .root.Values.pod }}
image: {{ $pod.image }}
imagePullPolicy: IfNotPresent
workingDir: {{ $pod.workingDir }}
env:
  {{- toYaml (concat $pod.env (.env | default list)) | nindent 2 }}
volumeMounts:
  - name: workspace
    mountPath: {{ $pod.mountPath }}
    {{- with $pod.subPath }}
    subPath: {{ . }}
    {{- end }}
  - name: dshm
    mountPath: /dev/shm
{{- end }}

{{/* requests = limits: GPUs and IB devices are extended resources, which Kubernetes does not overcommit. */}}
{{- define "substage.resources" -}}
resources:
  requests:
    {{- toYaml . | nindent 4 }}
  limits:
    {{- toYaml . | nindent 4 }}
{{- end }}
